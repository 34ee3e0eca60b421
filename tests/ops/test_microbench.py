"""pytest-benchmark microbenchmarks of the hot operations: the MiCE loss (the naive fp32 einsum reference, the best
plain-torch bf16 version of bench/bench_kernels.py and the fused Triton kernel), the batched augmentation and
spherical k-means.

    python -m pytest tests/test_microbench.py --benchmark-enable -m gpu      # the H100 figures (issue 5's shapes)
    python -m pytest tests/test_microbench.py --benchmark-enable             # everything this machine can run

The project's pytest options disable benchmarking, so in the ordinary suite each benchmark runs its function
once and the test checks the numbers (each implementation against the reference): a microbenchmark of a wrong
result fails. bench/bench_kernels.py (triton.testing.do_bench, forward and backward apart, peak memory) is
the benchmark of record for bench/RESULTS.md; these are for quick comparisons and regressions.
"""
import pytest
import torch

from fastmice.views.augment import MOCO_V1, augment_batch
from fastmice.ops.kmeans import spherical_kmeans
from fastmice.ops.mice_elbo import mice_elbo_reference
from fastmice.ops.metrics import cluster_metrics
from tests.helpers import load_script

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
bench_kernels = load_script("bench_kernels")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _impl(name: str):
    if name == "reference":
        return mice_elbo_reference
    if name == "torch_bf16":
        return bench_kernels.mice_elbo_torch_bf16
    from fastmice.ops.kernels.mice_elbo import mice_elbo_triton
    return mice_elbo_triton


# name, relative tolerance on the loss and on grad f against the fp32 reference
IMPLS = {"reference": 0.0, "torch_bf16": 3e-2, "triton": 2e-3}
CPU_SHAPE = dict(B=33, K=3, V=300, D=32)


def _loss_fwd_bwd(benchmark, impl: str, B: int, K: int, V: int, D: int, device: str, qdtype=torch.float32):
    inputs = bench_kernels._inputs(B, K, V, D, qdtype, device=device)
    f, v, g, mu, omega, queue = inputs
    fn = _impl(impl)

    def step():
        for t in (f, g, mu):
            t.grad = None
        loss, _ = fn(f, v, g, mu, omega, queue, 0.2, 1.0)
        loss.backward()
        _sync(device)
        return loss.detach(), f.grad.clone()

    loss, grad_f = benchmark(step)
    for t in (f, g, mu):
        t.grad = None
    ref_loss, _ = mice_elbo_reference(f, v, g, mu, omega, queue.float(), 0.2, 1.0)
    ref_loss.backward()
    tol = IMPLS[impl] + 1e-6
    ref = float(ref_loss.detach())
    assert torch.isfinite(loss) and abs(float(loss) - ref) <= tol * abs(ref)
    assert float((grad_f - f.grad).abs().max()) <= tol * float(f.grad.abs().max()) + 1e-7


@pytest.mark.parametrize("impl", ["reference", "torch_bf16"])
def test_loss_cpu(benchmark, impl):
    benchmark.group = "mice_elbo fwd+bwd cpu"
    _loss_fwd_bwd(benchmark, impl, device="cpu", **CPU_SHAPE)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("K", [10, 20])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_loss_gpu(benchmark, impl, K):
    benchmark.group = f"mice_elbo fwd+bwd B=256 K={K} V=16384 D=128 bf16 queue"
    _loss_fwd_bwd(benchmark, impl, B=256, K=K, V=16384, D=128, device="cuda", qdtype=torch.bfloat16)


def _augment(benchmark, device: str, B: int):
    x = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, device=device)
    gen = torch.Generator(device).manual_seed(0)
    mean = torch.tensor((0.4914, 0.4822, 0.4465), device=device)
    std = torch.tensor((0.2470, 0.2435, 0.2616), device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def views():
        out = [augment_batch(x, MOCO_V1, 32, mean, std, generator=gen, out_dtype=dtype,
                             channels_last=device == "cuda") for _ in range(3)]
        _sync(device)
        return out
    out = benchmark(views)
    assert all(v.shape == (B, 3, 32, 32) and v.dtype == dtype and bool(torch.isfinite(v).all()) for v in out)
    assert abs(float(torch.stack(out).float().mean())) < 1.0        # normalised
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])   # independent views
    gen.manual_seed(1)
    first = views()
    gen.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(first, views()))   # the generator alone decides


def test_augment_cpu(benchmark):
    benchmark.group = "3 MoCo-v1 views of 32 px images"
    _augment(benchmark, "cpu", 64)


@pytest.mark.gpu
@GPU
def test_augment_gpu(benchmark):
    benchmark.group = "3 MoCo-v1 views of 32 px images"
    _augment(benchmark, "cuda", 256)


def _kmeans(benchmark, device: str, n: int, d: int, k: int, backend: str):
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=1)
    truth = torch.arange(n) % k
    x = (centres[truth] + 0.05 * torch.randn(n, d, generator=gen)).to(device)
    labels, _ = benchmark(lambda: spherical_kmeans(x, k, niter=20, seed=0, backend=backend))
    # well-separated clusters: found again, up to a local optimum that splits one and merges two (ACC 0.9)
    assert cluster_metrics(truth.numpy(), labels)["acc"] >= 0.85


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_cpu(benchmark, backend):
    benchmark.group = "spherical k-means 5000x32 K=10"
    _kmeans(benchmark, "cpu", 5000, 32, 10, backend)


@pytest.mark.gpu
@GPU
def test_kmeans_gpu_torch(benchmark):
    benchmark.group = "spherical k-means 60000x128 K=10"
    _kmeans(benchmark, "cuda", 60000, 128, 10, "torch")
