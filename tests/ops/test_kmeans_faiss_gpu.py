"""Which k-means runs where: FAISS-GPU when a GPU build sees a GPU, FAISS on the CPU or torch otherwise.

No GPU here, so a fake `faiss` module stands in for a GPU build: it has StandardGpuResources and
get_num_gpus(), and its Kmeans records the `gpu` argument it was given and runs the real (CPU) FAISS, so the
clustering itself is still checked.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from fastmice.ops.kmeans import faiss_has_gpu, kmeans_raw_pixels, pick_backend, spherical_kmeans
from fastmice.ops.metrics import cluster_metrics

real_faiss = pytest.importorskip("faiss")


def fake_faiss(num_gpus, *, gpu_build=True, gpu_fails=False, query_fails=False):
    """A faiss module whose Kmeans calls are recorded in .calls (the `gpu` argument of each)."""
    mod = types.ModuleType("faiss")
    mod.calls = []

    class Kmeans:
        def __init__(self, d, k, **kw):
            mod.calls.append(kw.get("gpu"))
            if kw.get("gpu") and gpu_fails:
                raise RuntimeError("CUDA error: no kernel image is available\nmore detail")
            kw["gpu"] = False
            self._km = real_faiss.Kmeans(d, k, **kw)

        def train(self, x, init_centroids=None):
            return self._km.train(x, init_centroids=init_centroids)

        def assign(self, x):
            return self._km.assign(x)

        @property
        def centroids(self):
            return self._km.centroids

    def get_num_gpus():
        if query_fails:
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
        return num_gpus

    mod.Kmeans = Kmeans
    mod.get_num_gpus = get_num_gpus
    if gpu_build:
        mod.StandardGpuResources = type("StandardGpuResources", (), {})
    return mod


@pytest.fixture
def use_faiss(monkeypatch):
    def install(mod):
        monkeypatch.setitem(sys.modules, "faiss", mod)
        return mod
    return install


def blobs(k=4, per=50, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    y = torch.arange(k).repeat_interleave(per)
    return means[y] + 0.05 * torch.randn(k * per, d, generator=g), y.numpy()


def test_gpu_detection(use_faiss):
    assert faiss_has_gpu(fake_faiss(1)) and faiss_has_gpu(fake_faiss(4))
    assert not faiss_has_gpu(fake_faiss(0))                       # GPU build, no GPU visible
    assert not faiss_has_gpu(fake_faiss(1, gpu_build=False))      # faiss-cpu has no StandardGpuResources
    assert not faiss_has_gpu(fake_faiss(1, query_fails=True))     # CUDA runtime cannot start
    assert not faiss_has_gpu(None)


@pytest.mark.parametrize("mod, on_cuda, backend, expected", [
    ("gpu", True, "auto", "faiss-gpu"),
    ("gpu", True, "faiss", "faiss-gpu"),
    ("gpu", False, "auto", "faiss"),          # CPU data stays on the CPU (deterministic)
    ("gpu0", True, "auto", "torch"),          # GPU build but no GPU: CUDA data clusters with torch
    ("cpu", True, "auto", "torch"),
    ("cpu", True, "faiss", "faiss"),
    ("cpu", False, "auto", "faiss"),
    ("none", True, "auto", "torch"),
    ("none", False, "auto", "torch"),
    ("gpu", True, "torch", "torch"),
])
def test_pick_backend(use_faiss, mod, on_cuda, backend, expected):
    mods = {"gpu": fake_faiss(1), "gpu0": fake_faiss(0), "cpu": fake_faiss(1, gpu_build=False), "none": None}
    use_faiss(mods[mod])                       # sys.modules["faiss"] = None makes `import faiss` fail
    assert pick_backend(on_cuda, backend) == expected


def test_pick_backend_errors(use_faiss):
    use_faiss(None)
    with pytest.raises(ImportError, match="faiss"):
        pick_backend(False, "faiss")
    with pytest.raises(ValueError, match="backend"):
        pick_backend(False, "cuml")


def test_raw_pixel_kmeans_uses_the_gpu_build(use_faiss):
    x, y = blobs()
    images = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8).numpy()
    mod = use_faiss(fake_faiss(1))
    labels = kmeans_raw_pixels(images, 4, nredo=2)
    assert mod.calls == [1]                    # one FAISS fit, on one GPU
    assert cluster_metrics(y, labels)["acc"] == 1.0
    mod = use_faiss(fake_faiss(0))
    kmeans_raw_pixels(images, 4, nredo=2)
    assert mod.calls == [False]


def test_gpu_failure_falls_back_to_the_cpu(use_faiss):
    x, y = blobs(seed=1)
    images = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8).numpy()
    mod = use_faiss(fake_faiss(1, gpu_fails=True))
    with pytest.warns(RuntimeWarning, match="FAISS k-means on the GPU failed \\(CUDA error: no kernel image"):
        labels = kmeans_raw_pixels(images, 4, nredo=2)
    assert mod.calls == [1, False]             # tried the GPU, then the CPU
    assert cluster_metrics(y, labels)["acc"] == 1.0


def test_spherical_kmeans_on_cpu_data_ignores_the_gpu_build(use_faiss):
    x, y = blobs(seed=2)
    mod = use_faiss(fake_faiss(1))
    labels, cents = spherical_kmeans(x, 4, nredo=2, seed=0)
    assert mod.calls and all(c is False for c in mod.calls)
    assert cluster_metrics(y, labels)["acc"] == 1.0
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
