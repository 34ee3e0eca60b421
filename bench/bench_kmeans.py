"""Benchmark fastmice.spherical_kmeans: every backend this machine has, at the sizes evaluation meets.

    python bench/bench_kmeans.py [--sizes 60000x128x10 1000000x128x1000] [--niter 20] [--json OUT]

Backends, each on the same clustered data (unit vectors around K random centres, so the objective is
comparable): faiss-cpu; faiss-gpu when FAISS has GPU support and CUDA is present; torch on the CPU; torch on
CUDA (the fallback for machines with a GPU but no FAISS-GPU). Each run uses every point (nothing
subsampled), the same kmeans++ seed and `niter` iterations; reported: wall seconds (after one warm-up run
at a small size, CUDA synchronised), seconds per iteration, and the mean cosine similarity of each point to
its centre (the spherical k-means objective; higher is better), so speed is not bought with quality.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from fastmice.ops.kmeans import faiss_has_gpu, import_faiss, spherical_kmeans


def clustered(n: int, d: int, k: int, seed: int = 0, spread: float = 0.6) -> torch.Tensor:
    """(n, d) unit vectors, each a noisy copy of one of k random unit centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    idx = torch.randint(0, k, (n,), generator=g)
    x = centres[idx] + spread * torch.randn(n, d, generator=g) / d ** 0.5
    return torch.nn.functional.normalize(x, dim=1)


def backends() -> list[tuple[str, str, str]]:
    """(name, spherical_kmeans backend, tensor device) for what this machine has."""
    out = []
    try:
        faiss = import_faiss()
        out.append(("faiss-cpu", "faiss", "cpu"))
        if torch.cuda.is_available() and faiss_has_gpu(faiss):
            out.append(("faiss-gpu", "faiss", "cuda"))
    except ImportError:
        pass
    out.append(("torch-cpu", "torch", "cpu"))
    if torch.cuda.is_available():
        out.append(("torch-cuda", "torch", "cuda"))
    return out


def objective(x: torch.Tensor, labels: np.ndarray, centroids: np.ndarray) -> float:
    c = torch.from_numpy(centroids)[torch.from_numpy(labels)]
    return float((x.cpu() * c).sum(1).mean())


def run_one(x: torch.Tensor, k: int, niter: int, backend: str, device: str) -> dict:
    xd = x.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    labels, cents = spherical_kmeans(xd, k, niter=niter, seed=0, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    return {"seconds": sec, "s_per_iter": sec / max(niter, 1), "objective": objective(x, labels, cents)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["60000x128x10", "1000000x128x1000"], metavar="NxDxK")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--only", nargs="*", help="backend names to run (default: all available)")
    ap.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    chosen = [b for b in backends() if not args.only or b[0] in args.only]
    print(f"# {platform.node()} torch {torch.__version__} threads {torch.get_num_threads()} "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for _, backend, device in chosen:   # warm-up: imports, CUDA context, kernels
        run_one(clustered(2000, 16, 4), 4, 2, backend, device)
    rows = []
    print(f"{'N':>9} {'D':>4} {'K':>5} {'backend':<11} {'seconds':>9} {'s/iter':>8} {'objective':>9}")
    for size in args.sizes:
        n, d, k = (int(v) for v in size.lower().split("x"))
        x = clustered(n, d, k)
        for name, backend, device in chosen:
            r = {"n": n, "d": d, "k": k, "backend": name, "niter": args.niter,
                 **run_one(x, k, args.niter, backend, device)}
            rows.append(r)
            print(f"{n:>9} {d:>4} {k:>5} {name:<11} {r['seconds']:>9.2f} {r['s_per_iter']:>8.3f} "
                  f"{r['objective']:>9.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
