"""Fused MiCE expert log-likelihood: the queue logsumexp of Eq. (9) streamed by Triton.

The expensive part of the MiCE objective is, for every (b, k), the logsumexp over the V queue
negatives of expert k:  lse_neg[b, k] = logsumexp_i q[k, i] . s[b, k] / tau.  The reference
materialises the (B, K, V) logits; these kernels never do. Each program owns one expert k, one block of
BLOCK_B batch rows and one chunk of the queue (a split of V, flash-decoding style, so that small K still
fills the GPU), and streams its queue tiles once with an online logsumexp (running max + running sum,
fp32, base 2). The backward recomputes the logits tile by tile from the saved lse (flash-attention style)
and accumulates sum_i p_i q_i with tl.dot.

Precision: bf16/fp16 queues feed the tensor cores in their own dtype, and the fp32 operand (s in the
forward, p in the backward) is split into hi + lo halves of that dtype (two dots, fp32 accumulation), so
the only rounding is the queue's own storage: the result matches the fp32 reference run on the same
rounded queue to ~1e-5. fp32 queues use 3xTF32 dots on NVIDIA GPUs (~fp32 accuracy) and fp32 elsewhere.

The cheap O(B K D) parts (positive logit, combination of the split partials, the gating prior, the
posterior and the loss) are plain fp32 torch, so autograd carries the gradients of f, g and mu.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from torch import Tensor

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _load_scaled_s(S_ptr, pid_k, offs_b, offs_d, mask_b, mask_d, stride_sb, stride_sk, scale):
    ptrs = S_ptr + offs_b[:, None].to(tl.int64) * stride_sb + pid_k * stride_sk + offs_d[None, :]
    s = tl.load(ptrs, mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    return s * scale  # logits come out in base 2: log2(e) / tau folded into s


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST does it in fp32 (exact for 16-bit inputs): the Triton
    interpreter mis-multiplies bfloat16 operands (it stores them as uint16), so it takes this path."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_logits(s, s_hi, s_lo, q, SPLIT_PREC: tl.constexpr, UPCAST: tl.constexpr, FP32_PREC: tl.constexpr):
    """(BLOCK_B, BLOCK_V) base-2 logits s . q^T, fp32 accumulation."""
    if SPLIT_PREC:
        if UPCAST:
            x = tl.dot(s_hi.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:
            x = tl.dot(s_hi, tl.trans(q))
        x = _dot(s_lo, tl.trans(q), x, UPCAST)
    else:
        x = tl.dot(s, tl.trans(q.to(tl.float32)), input_precision=FP32_PREC)
    return x


@triton.jit
def _mice_neg_lse_fwd_kernel(
    S_ptr, Q_ptr, LSE_ptr,
    B, V, D, chunk,
    stride_sb, stride_sk, stride_qk, stride_qv, stride_ls, stride_lb,
    scale,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_PREC: tl.constexpr, UPCAST: tl.constexpr, FP32_PREC: tl.constexpr,
):
    """LSE[split, b, k] = log2 sum_{i in chunk(split)} 2^(q[k,i] . s[b,k] * log2(e)/tau)  (-inf if empty)."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    mask_b = offs_b < B
    mask_d = offs_d < D
    s = _load_scaled_s(S_ptr, pid_k, offs_b, offs_d, mask_b, mask_d, stride_sb, stride_sk, scale)
    s_hi = s.to(Q_ptr.dtype.element_ty)
    s_lo = (s - s_hi.to(tl.float32)).to(Q_ptr.dtype.element_ty)
    q_base = Q_ptr + pid_k.to(tl.int64) * stride_qk

    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_B], tl.float32)
    v_start = pid_s * chunk
    v_end = tl.minimum(v_start + chunk, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        q = tl.load(q_base + offs_v[:, None].to(tl.int64) * stride_qv + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        x = _tile_logits(s, s_hi, s_lo, q, SPLIT_PREC, UPCAST, FP32_PREC)
        x = tl.where(mask_v[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log2(l_i)
    tl.store(LSE_ptr + pid_s.to(tl.int64) * stride_ls + offs_b * stride_lb + pid_k, lse, mask=mask_b)


@triton.jit
def _mice_neg_bwd_kernel(
    S_ptr, Q_ptr, LSE_ptr, ACC_ptr,
    B, V, D, chunk,
    stride_sb, stride_sk, stride_qk, stride_qv, stride_lb, stride_as, stride_ab, stride_ak,
    scale,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    SPLIT_PREC: tl.constexpr, UPCAST: tl.constexpr, FP32_PREC: tl.constexpr,
):
    """ACC[split, b, k, :] = sum_{i in chunk(split)} p[b,k,i] q[k,i,:], p = 2^(logit2 - LSE2[b,k]).

    Each program writes BLOCK_DO of the D columns (grid axis 0 runs over k and the BLOCK_D // BLOCK_DO column
    chunks): the logits need the whole of D, but a narrower accumulator is what keeps the fp32 queue at
    D 256 from spilling registers on sm_90; its q columns are loaded a second time (from cache)."""
    N_DO: tl.constexpr = BLOCK_D // BLOCK_DO
    pid_k = tl.program_id(0) // N_DO
    pid_do = tl.program_id(0) % N_DO
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    offs_do = pid_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_b = offs_b < B
    mask_d = offs_d < D
    mask_do = offs_do < D
    s = _load_scaled_s(S_ptr, pid_k, offs_b, offs_d, mask_b, mask_d, stride_sb, stride_sk, scale)
    s_hi = s.to(Q_ptr.dtype.element_ty)
    s_lo = (s - s_hi.to(tl.float32)).to(Q_ptr.dtype.element_ty)
    lse = tl.load(LSE_ptr + offs_b * stride_lb + pid_k, mask=mask_b, other=0.0)  # base 2, incl. positive
    q_base = Q_ptr + pid_k.to(tl.int64) * stride_qk

    acc = tl.zeros([BLOCK_B, BLOCK_DO], tl.float32)
    v_start = pid_s * chunk
    v_end = tl.minimum(v_start + chunk, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        rows = q_base + offs_v[:, None].to(tl.int64) * stride_qv
        q = tl.load(rows + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        x = _tile_logits(s, s_hi, s_lo, q, SPLIT_PREC, UPCAST, FP32_PREC)
        p = tl.where(mask_v[None, :], tl.exp2(x - lse[:, None]), 0.0)
        if N_DO == 1:
            q_out = q
        else:
            q_out = tl.load(rows + offs_do[None, :], mask=mask_v[:, None] & mask_do[None, :], other=0.0)
        if SPLIT_PREC:
            p_hi = p.to(Q_ptr.dtype.element_ty)
            p_lo = (p - p_hi.to(tl.float32)).to(Q_ptr.dtype.element_ty)
            acc = _dot(p_hi, q_out, acc, UPCAST)
            acc = _dot(p_lo, q_out, acc, UPCAST)
        else:
            acc = tl.dot(p, q_out.to(tl.float32), acc, input_precision=FP32_PREC)
    out = (ACC_ptr + pid_s.to(tl.int64) * stride_as + offs_b[:, None].to(tl.int64) * stride_ab
           + pid_k * stride_ak + offs_do[None, :])
    tl.store(out, acc, mask=mask_b[:, None] & mask_do[None, :])


# ----------------------------------------------------------------------------------------- launch glue

def _is_interpreted() -> bool:
    return type(_mice_neg_lse_fwd_kernel).__name__ == "InterpretedFunction"


def _fp32_precision() -> str:
    # fp32 queues: 3xTF32 on the tensor cores (~fp32 accuracy); plain fp32 FMAs ("ieee") spill badly
    return "ieee" if _is_interpreted() or torch.version.hip else "tf32x3"


# (BLOCK_B, BLOCK_V, num_warps, num_stages[, BLOCK_DO: the backward's output columns per program, default all])
# per (kernel, 16-bit queue, BLOCK_D > 128), best first; the
# later entries are fallbacks for a GPU where the first does not fit (OutOfResources at launch). Every entry
# is compiled ahead of time for sm_90 and sm_80 in CI (fastmice.ops.kernels.aot, tests/ops/test_kernel_fit.py):
# shared memory within the target's limit and no register spills. Speed ranking still to be tuned on the GPU.
CONFIGS = {
    ("fwd", True, False): [(64, 128, 4, 3), (64, 64, 4, 2), (16, 16, 4, 1)],
    ("bwd", True, False): [(64, 64, 8, 2), (32, 64, 4, 2), (16, 16, 4, 1)],
    ("fwd", True, True): [(64, 64, 4, 3), (32, 32, 4, 2), (16, 16, 4, 1)],
    ("bwd", True, True): [(32, 64, 8, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    ("fwd", False, False): [(32, 64, 8, 3), (64, 16, 4, 2), (16, 16, 4, 1)],
    ("bwd", False, False): [(32, 32, 8, 3), (32, 16, 8, 2), (16, 16, 4, 1)],
    ("fwd", False, True): [(16, 32, 4, 2), (16, 32, 4, 1)],
    ("bwd", False, True): [(16, 16, 8, 1, 128)],   # every unsplit config spills at D 256 on sm_90
}
_FITS: dict = {}  # (kernel, 16-bit, wide D, device) -> index of the first config that launched


def _plan(kind: str, cfg_idx: int, B: int, K: int, V: int, D: int, queue: Tensor,
          num_splits: int | None) -> dict:
    """Block sizes, warps, stages and the number of V splits (programs per (k, batch block))."""
    block_d = max(16, triton.next_power_of_2(D))
    configs = CONFIGS[(kind, queue.dtype != torch.float32, block_d > 128)]
    bb, bv, num_warps, num_stages, *col = configs[cfg_idx]
    block_b = min(bb, max(16, triton.next_power_of_2(B)))  # tl.dot needs every dim >= 16
    block_v = min(bv, max(16, triton.next_power_of_2(V)))
    n_tiles = triton.cdiv(V, block_v)
    if num_splits is None:
        num_splits = 1
        if queue.device.type == "cuda":
            n_sm = torch.cuda.get_device_properties(queue.device).multi_processor_count
            base = K * triton.cdiv(B, block_b)
            # ~2 waves of programs, but keep >= 4 queue tiles per program to amortise the s tile
            num_splits = max(1, min(triton.cdiv(2 * n_sm, base), n_tiles // 4))
    num_splits = max(1, min(int(num_splits), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, num_splits)
    return dict(BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, BLOCK_DO=min(col[0], block_d) if col else block_d,
                chunk=tiles_per_split * block_v,
                num_splits=triton.cdiv(n_tiles, tiles_per_split),  # no empty splits
                num_warps=num_warps, num_stages=num_stages, n_configs=len(configs))


def _launch(kind: str, run, s: Tensor, queue: Tensor, num_splits: int | None) -> Tensor:
    """run(cfg) launches the kernel and returns its output; falls back on OutOfResources."""
    B, K, D = s.shape
    key = (kind, queue.dtype != torch.float32, D > 128, str(queue.device))
    idx = _FITS.get(key, 0)
    while True:
        cfg = _plan(kind, idx, B, K, queue.shape[1], D, queue, num_splits)
        try:
            out = run(cfg)
        except OutOfResources:
            if idx + 1 >= cfg["n_configs"]:
                raise
            idx += 1
            continue
        _FITS[key] = idx
        return out


def _check_inputs(s: Tensor, queue: Tensor) -> None:
    if s.device.type != "cuda" and not _is_interpreted():
        raise RuntimeError(
            "fastmice.ops.kernels.mice_elbo got CPU tensors but its Triton kernels were compiled for the GPU: set "
            "TRITON_INTERPRET=1 before importing fastmice.ops.kernels.mice_elbo to run them in the interpreter, "
            "or use fastmice.ops.mice_elbo.mice_elbo_reference.")
    if queue.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"queue dtype must be float32, bfloat16 or float16, got {queue.dtype}")
    if queue.device != s.device:
        raise ValueError(f"queue is on {queue.device} but s is on {s.device}")


def _neg_lse(s: Tensor, queue: Tensor, tau: float, num_splits: int | None) -> Tensor:
    """(splits, B, K) base-2 partial logsumexps of the negatives of each V split."""
    B, K, D = s.shape

    def run(cfg):
        out = torch.empty((cfg["num_splits"], B, K), device=s.device, dtype=torch.float32)
        grid = (K, triton.cdiv(B, cfg["BLOCK_B"]), cfg["num_splits"])
        _mice_neg_lse_fwd_kernel[grid](
            s, queue, out, B, queue.shape[1], D, cfg["chunk"],
            s.stride(0), s.stride(1), queue.stride(0), queue.stride(1), out.stride(0), out.stride(1),
            _LOG2E / tau,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            SPLIT_PREC=queue.dtype != torch.float32, UPCAST=_is_interpreted(), FP32_PREC=_fp32_precision(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out

    return _launch("fwd", run, s, queue, num_splits)


def _neg_weighted_sum(s: Tensor, queue: Tensor, lse2: Tensor, tau: float, num_splits: int | None) -> Tensor:
    """(B, K, D) sum_i p_i q_i over the negatives, given the full base-2 lse (B, K)."""
    B, K, D = s.shape

    def run(cfg):
        S = cfg["num_splits"]
        out = torch.empty((S, B, K, D), device=s.device, dtype=torch.float32)
        grid = (K * (cfg["BLOCK_D"] // cfg["BLOCK_DO"]), triton.cdiv(B, cfg["BLOCK_B"]), S)
        _mice_neg_bwd_kernel[grid](
            s, queue, lse2, out, B, queue.shape[1], D, cfg["chunk"],
            s.stride(0), s.stride(1), queue.stride(0), queue.stride(1), lse2.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            _LOG2E / tau,
            BLOCK_B=cfg["BLOCK_B"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=cfg["BLOCK_DO"],
            SPLIT_PREC=queue.dtype != torch.float32, UPCAST=_is_interpreted(), FP32_PREC=_fp32_precision(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        return out[0] if S == 1 else out.sum(0)

    return _launch("bwd", run, s, queue, num_splits)


class MiceElboFunction(torch.autograd.Function):
    """log phi[b, k] = l_pos - logsumexp(l_pos, q_{1..V,k} . s_{b,k} / tau), l_pos = v_{b,k} . s_{b,k} / tau.

    forward(s (B,K,D), v (B,K,D), queue (K,V,D), tau, num_splits=None) -> log_phi (B,K) fp32.
    Differentiable in s only.
    """

    @staticmethod
    def forward(ctx, s: Tensor, v: Tensor, queue: Tensor, tau: float, num_splits: int | None = None) -> Tensor:
        s = s.float().contiguous()
        v = v.float()
        if queue.stride(-1) != 1:
            queue = queue.contiguous()
        _check_inputs(s, queue)
        l_pos = (v * s).sum(-1) / tau                                        # (B, K)
        partial = _neg_lse(s, queue, tau, num_splits) * _LN2                # (S, B, K) natural log
        lse = torch.logsumexp(torch.cat([l_pos.unsqueeze(0), partial], 0), 0)
        ctx.save_for_backward(s, v, queue, lse, l_pos)
        ctx.tau, ctx.num_splits = tau, num_splits
        return l_pos - lse

    @staticmethod
    def backward(ctx, grad_log_phi: Tensor):
        s, v, queue, lse, l_pos = ctx.saved_tensors
        tau = ctx.tau
        lse2 = (lse * _LOG2E).contiguous()
        acc = _neg_weighted_sum(s, queue, lse2, tau, ctx.num_splits)       # sum_i p_i q_i
        p_pos = torch.exp(l_pos - lse).unsqueeze(-1)
        # d log phi / ds = (v - sum_{x in {v, q}} p_x x) / tau
        grad_s = grad_log_phi.float().unsqueeze(-1) / tau * ((1.0 - p_pos) * v - acc)
        return grad_s, None, None, None, None


def mice_elbo_triton(
    f: Tensor, v: Tensor, g: Tensor, mu: Tensor, omega: Tensor, queue: Tensor,
    tau: float = 1.0, kappa: float = 1.0, num_splits: int | None = None, *, learn_omega: bool = False,
) -> tuple[Tensor, Tensor]:
    """Same contract as fastmice.ops.mice_elbo.mice_elbo_reference, with the queue part fused.

    Returns (loss: 0-dim, differentiable in f, g, mu; posterior: (B, K) detached, fp32).
    """
    tau, kappa = float(tau), float(kappa)
    with torch.autocast(device_type=f.device.type, enabled=False):
        s = f.float() + F.normalize(mu.float(), dim=1)                      # (B, K, D)
        log_phi = MiceElboFunction.apply(s, v.detach(), queue.detach(), tau, num_splits)
        omega = omega.float() if learn_omega else omega.detach().float()
        log_pi = F.log_softmax(g.float() @ omega.t() / kappa, dim=-1)
        joint = log_pi + log_phi
        log_evidence = torch.logsumexp(joint, dim=-1)
        posterior = torch.exp(joint - log_evidence.unsqueeze(-1)).detach()
        loss = -log_evidence.mean()
    return loss, posterior


# The two kernels by the names CONFIGS uses, for ahead-of-time compilation (fastmice.ops.kernels.aot).
KERNELS = {"fwd": _mice_neg_lse_fwd_kernel, "bwd": _mice_neg_bwd_kernel}

__all__ = ["CONFIGS", "KERNELS", "MiceElboFunction", "mice_elbo_triton"]
