"""Benchmark the fused MiCE loss (fastmice.ops.kernels.mice_elbo) against plain torch.

    python bench/bench_kernels.py [--B 256] [--V 16384] [--D 128] [--K 10 15 20] [--queue-dtype bfloat16]
        [--json OUT] [--device cuda|cpu]

Implementations, each timed with triton.testing.do_bench for forward, backward and forward+backward:
  reference   fastmice.ops.mice_elbo.mice_elbo_reference: fp32 einsum, materialises the (B, K, V) logits
  torch_bf16  best-effort plain torch: bf16 bmm logits, bf16 exp with fp32 sums (fast, less accurate)
  triton      fastmice.ops.kernels.mice_elbo.mice_elbo_triton: streamed queue, online logsumexp
Peak memory is torch.cuda.max_memory_allocated during one forward+backward, minus what was allocated
before (inputs). Errors are max|x - ref| / max|ref| against the reference on the same queue values.
Needs a CUDA GPU; without one it says so and exits 0, unless --device cpu: a smoke run at tiny sizes
(times from a perf_counter loop, peak memory not measured, Triton only when TRITON_INTERPRET=1 was set before
the start: its interpreter), which checks the script, not the speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_train.commit


def mice_elbo_torch_bf16(f: Tensor, v: Tensor, g: Tensor, mu: Tensor, omega: Tensor, queue: Tensor,
                         tau: float = 1.0, kappa: float = 1.0) -> tuple[Tensor, Tensor]:
    """Plain torch, queue logits in bf16 on the tensor cores; the O(BK) parts in fp32."""
    s = f.float() + F.normalize(mu.float(), dim=1)                                   # (B, K, D)
    l_pos = (v.detach().float() * s).sum(-1) / tau                                   # (B, K)
    q = queue.detach().to(torch.bfloat16)
    l_neg = torch.bmm(s.transpose(0, 1).to(torch.bfloat16), q.transpose(1, 2)) / tau  # (K, B, V) bf16
    m = torch.maximum(l_neg.amax(-1).float(), l_pos.t())                             # (K, B)
    sum_neg = torch.exp(l_neg - m.unsqueeze(-1).to(torch.bfloat16)).sum(-1, dtype=torch.float32)
    log_z = (m + torch.log(sum_neg + torch.exp(l_pos.t() - m))).t()                  # (B, K)
    log_phi = l_pos - log_z
    log_pi = F.log_softmax(g.float() @ omega.detach().float().t() / kappa, dim=-1)
    joint = log_pi + log_phi
    log_evidence = torch.logsumexp(joint, dim=-1)
    posterior = torch.exp(joint - log_evidence.unsqueeze(-1)).detach()
    return -log_evidence.mean(), posterior


def _inputs(B: int, K: int, V: int, D: int, qdtype: torch.dtype, device: str = "cuda"):
    gen = torch.Generator(device).manual_seed(0)
    f = F.normalize(torch.randn(B, K, D, device=device, generator=gen), dim=-1).requires_grad_(True)
    v = F.normalize(torch.randn(B, K, D, device=device, generator=gen), dim=-1)
    g = F.normalize(torch.randn(B, D, device=device, generator=gen), dim=-1).requires_grad_(True)
    mu = torch.randn(K, D, device=device, generator=gen).requires_grad_(True)
    omega = torch.randn(K, D, device=device, generator=gen)
    queue = F.normalize(torch.randn(K, V, D, device=device, generator=gen), dim=-1).to(qdtype)
    return f, v, g, mu, omega, queue


def cpu_bench(fn, grad_to_none=(), reps: int = 3) -> float:
    """Mean ms of `reps` calls after one warm-up (the CPU smoke run's stand-in for triton's do_bench)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        for t in grad_to_none:
            t.grad = None
        fn()
    return 1000 * (time.perf_counter() - t0) / reps


def _bench_one(fn, args, tau, kappa, do_bench) -> dict:
    f, v, g, mu, omega, queue = args
    leaves = [f, g, mu]
    cuda = f.is_cuda

    def fwd():
        return fn(f, v, g, mu, omega, queue, tau, kappa)

    loss, _ = fwd()
    out = {"fwd": do_bench(fwd, grad_to_none=leaves)}
    out["bwd"] = do_bench(lambda: loss.backward(retain_graph=True), grad_to_none=leaves)
    out["fwd+bwd"] = do_bench(lambda: fwd()[0].backward(), grad_to_none=leaves)
    del loss
    for t in leaves:
        t.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss, post = fwd()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    out["result"] = (loss.detach(), post, f.grad.clone(), g.grad.clone(), mu.grad.clone())
    for t in leaves:
        t.grad = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--V", type=int, default=16384)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--K", type=int, nargs="+", default=[10, 15, 20])
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--kappa", type=float, default=1.0)
    p.add_argument("--queue-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (see above)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    a = p.parse_args(argv)

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none found): nothing to benchmark.")
        return 0

    import triton

    from fastmice.ops.mice_elbo import mice_elbo_reference

    if a.device == "cuda":
        from triton.testing import do_bench
        name = torch.cuda.get_device_name()
    else:
        do_bench, name = cpu_bench, f"cpu ({platform.processor() or platform.machine()})"
    torch.set_float32_matmul_precision("highest")   # the reference is true fp32 (no TF32)
    qdtype = getattr(torch, a.queue_dtype)
    impls = {"reference": mice_elbo_reference, "torch_bf16": mice_elbo_torch_bf16}
    if a.device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from fastmice.ops.kernels.mice_elbo import mice_elbo_triton
        impls["triton"] = mice_elbo_triton
    rows = []
    print(f"# {name}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"# B={a.B} V={a.V} D={a.D} queue={a.queue_dtype} tau={a.tau} kappa={a.kappa}  (times in ms)")
    hdr = f"{'K':>4} {'impl':<11} {'fwd':>8} {'bwd':>8} {'fwd+bwd':>8} {'peak MiB':>9} {'err loss':>9} {'err grad':>9}"
    print(hdr)
    print("-" * len(hdr))
    for K in a.K:
        args = _inputs(a.B, K, a.V, a.D, qdtype, a.device)
        ref_args = args[:5] + (args[5].float(),)   # the oracle sees the same (rounded) queue values
        res = {}
        for name, fn in impls.items():
            res[name] = _bench_one(fn, ref_args if name == "reference" else args, a.tau, a.kappa, do_bench)
        ref = res["reference"]["result"]
        for name, r in res.items():
            errs = [((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                    for x, y in zip(r["result"], ref)]
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            print(f"{K:>4} {name:<11} {r['fwd']:>8.3f} {r['bwd']:>8.3f} {r['fwd+bwd']:>8.3f} "
                  f"{peak:>9} {errs[0]:>9.1e} {max(errs[2:]):>9.1e}")
            rows.append({"K": K, "impl": name, "fwd_ms": r["fwd"], "bwd_ms": r["bwd"], "fwd_bwd_ms": r["fwd+bwd"],
                         "peak_mib": r["peak_mib"], "err_loss": errs[0], "err_grad": max(errs[2:])})
        del args, ref_args, res
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if a.json is not None:
        from bench_train import commit   # bench/ is a folder of scripts, not a package
        report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                  "device": name, "torch": torch.__version__, "triton": triton.__version__,
                  "python": platform.python_version(), "B": a.B, "V": a.V, "D": a.D, "queue_dtype": a.queue_dtype,
                  "tau": a.tau, "kappa": a.kappa, "rows": rows}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))
        print(f"written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
