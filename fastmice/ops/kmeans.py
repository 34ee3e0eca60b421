"""Spherical k-means (FAISS, or pure torch on GPUs without FAISS-GPU) and a raw-pixel baseline.

FAISS is imported lazily so that ``import fastmice`` stays fast and so that a machine
without FAISS can still cluster with the torch implementation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["spherical_kmeans", "torch_spherical_kmeans", "euclidean_kmeans", "kmeans_raw_pixels", "pick_backend",
           "faiss_has_gpu"]

_EPS = 1e-12
# Upper bound on the elements of one (chunk x k) similarity block in the torch path (~256 MB fp32).
_BLOCK_ELEMS = 1 << 26


# --------------------------------------------------------------------------- validation


def _as_float_tensor(x: Any, name: str = "x") -> torch.Tensor:
    """Return x as a float32 2-D torch tensor on its own device, after validation."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(x))
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return t


def _check_k(k: int, n: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if k > n:
        raise ValueError(f"K too large: cannot make {k} clusters from {n} points")
    return int(k)


def _prepare_init(init_centroids: Any, k: int, d: int, device: torch.device) -> torch.Tensor | None:
    """Validate and L2-normalise the optional initial centres (only directions matter here)."""
    if init_centroids is None:
        return None
    c = _as_float_tensor(init_centroids, "init_centroids").to(device)
    if tuple(c.shape) != (k, d):
        raise ValueError(f"init_centroids must have shape ({k}, {d}), got {tuple(c.shape)}")
    return F.normalize(c, dim=1, eps=_EPS)


def import_faiss():
    """The faiss module, or None where neither faiss-cpu nor faiss-gpu is installed (both install `faiss`)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_has_gpu(faiss) -> bool:
    """Whether this faiss is a GPU build (faiss-gpu: it has StandardGpuResources) that sees at least one GPU.
    A GPU build whose CUDA runtime cannot start (no driver, a driver too old) counts as CPU-only."""
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return int(faiss.get_num_gpus()) > 0
    except Exception:  # noqa: BLE001 - any failure to query the GPUs means: use the CPU path
        return False


# --------------------------------------------------------------------------- FAISS path


def _faiss_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    nredo: int,
    spherical: bool,
    init_centroids: np.ndarray | None,
    verbose: bool,
    gpu: bool,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run faiss.Kmeans on a float32 C-contiguous array, on one GPU if `gpu` (falling back to the CPU with a
    RuntimeWarning when FAISS's GPU run raises, e.g. a CUDA runtime the driver rejects or out of memory).

    Returns (labels int64, centroids, objective); the objective is the summed inner product
    for spherical k-means (higher is better) and minus the summed squared distance otherwise.
    """
    faiss = import_faiss()
    if faiss is None:
        raise ImportError("faiss is not installed: pip install faiss-cpu, or use backend='torch'")
    run = dict(niter=niter, seed=seed, nredo=nredo, spherical=spherical, init_centroids=init_centroids,
               verbose=verbose)
    if gpu:
        try:
            return _faiss_kmeans_run(faiss, x, k, gpus=1, **run)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"FAISS k-means on the GPU failed ({first}); running it on the CPU instead",
                          RuntimeWarning, stacklevel=3)
    return _faiss_kmeans_run(faiss, x, k, gpus=0, **run)


def _faiss_kmeans_run(faiss, x: np.ndarray, k: int, *, niter: int, seed: int, nredo: int, spherical: bool,
                      init_centroids: np.ndarray | None, verbose: bool, gpus: int):
    """One faiss.Kmeans fit and assignment on `gpus` GPUs (0: the CPU); see _faiss_kmeans."""
    n, d = x.shape
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=spherical,
        verbose=verbose,
        # FAISS silently subsamples to k*max_points_per_centroid points: use every point.
        max_points_per_centroid=max(256, math.ceil(n / k)),
        # The default (39) only triggers a warning on small data sets.
        min_points_per_centroid=1,
        gpu=gpus if gpus else False,
    )
    km.train(x, init_centroids=init_centroids)
    dist, labels = km.assign(x)
    obj = float(dist.astype(np.float64).sum())
    cents = np.ascontiguousarray(km.centroids, dtype=np.float32)
    return labels.astype(np.int64), cents, obj if spherical else -obj


# --------------------------------------------------------------------------- torch path


def _row_chunk(k: int) -> int:
    """Rows per (rows x k) similarity block."""
    return max(1, _BLOCK_ELEMS // max(k, 1))


@torch.no_grad()
def _assign(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre by cosine similarity, in row chunks to bound memory: (labels, best sim)."""
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    best = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _row_chunk(c.shape[0])
    for i in range(0, x.shape[0], step):
        sims = x[i : i + step] @ c.T
        best[i : i + step], labels[i : i + step] = sims.max(dim=1)
    return labels, best


@torch.no_grad()
def _cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts.

    index_add_ accumulates in exact fp32 (a one-hot matmul would be rounded by TF32 if the
    caller enabled it) and switches to a deterministic kernel under
    torch.use_deterministic_algorithms(True) on CUDA.
    """
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, labels, x)
    return sums, torch.bincount(labels, minlength=k)


@torch.no_grad()
def _kmeanspp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ on the sphere (squared chord distance 2 - 2 cos), sampled with `gen`.

    Indices stay on the device (no .item()) so a CUDA run does not sync once per centre.
    """
    n = x.shape[0]
    idx = torch.randint(n, (1,), generator=gen, device=x.device)
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[idx[0]]
    d2 = (2.0 - 2.0 * (x @ centres[0])).clamp_min_(0.0)
    for j in range(1, k):
        # Inverse-CDF sampling instead of torch.multinomial, which is capped at 2**24 categories.
        cdf = torch.cumsum(d2.double(), dim=0)
        total = cdf[-1]
        u = torch.rand(1, generator=gen, device=x.device, dtype=torch.float64)
        # right=True skips points at distance 0 (already chosen): their cdf step is empty.
        by_dist = torch.searchsorted(cdf, u * total, right=True)
        uniform = (u * n).long()  # fallback when every point coincides with a centre
        idx = torch.where(total > 0, by_dist, uniform).clamp_max_(n - 1)
        centres[j] = x[idx[0]]
        d2 = torch.minimum(d2, (2.0 - 2.0 * (x @ centres[j])).clamp_min_(0.0))
    return centres


@torch.no_grad()
def _reseed_empty(c: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, best: torch.Tensor) -> None:
    """Move the centres of empty clusters onto the points farthest from their own centre."""
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return
    far = torch.topk(best, empty.numel(), largest=False).indices
    c[empty] = x[far]


@torch.no_grad()
def _torch_kmeans_once(
    x: torch.Tensor, k: int, niter: int, init: torch.Tensor, verbose: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    c = init.clone()
    prev = None
    for it in range(niter):
        labels, best = _assign(x, c)
        if verbose:
            print(f"[torch k-means] iter {it}: objective {float(best.sum()):.4f}")
        if prev is not None and torch.equal(labels, prev):
            break  # assignment is stable, so the centres would not move
        prev = labels
        sums, counts = _cluster_sums(x, labels, k)
        c = F.normalize(sums, dim=1, eps=_EPS)
        _reseed_empty(c, x, counts, best)
    labels, best = _assign(x, c)
    return labels, c, float(best.sum())


def _random_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct data points chosen uniformly (FAISS's default initialisation)."""
    perm = torch.randperm(x.shape[0], generator=gen, device=gen.device)[:k]
    return x[perm.to(x.device)]


def _seeded_init(x: torch.Tensor, k: int, seed: int, init: str) -> torch.Tensor:
    if init == "kmeans++":
        return _kmeanspp_init(x, k, torch.Generator(device=x.device).manual_seed(seed))
    return _random_init(x, k, torch.Generator(device=x.device).manual_seed(seed))


@torch.no_grad()
def torch_spherical_kmeans(
    x: torch.Tensor,
    k: int,
    *,
    niter: int = 50,
    seed: int = 0,
    nredo: int = 1,
    init_centroids: torch.Tensor | None = None,
    init: str = "kmeans++",
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch spherical k-means on x's device (CPU or CUDA).

    x must already be validated float32 (N, D). Rows are L2-normalised here. Each restart r
    starts from ``init`` ('kmeans++' or 'random') seeded with ``seed + r``; the run with the
    highest summed cosine similarity is kept. Returns (labels int64 (N,), unit-norm centroids (k, D)).
    """
    x = F.normalize(x, dim=1, eps=_EPS)
    given = _prepare_init(init_centroids, k, x.shape[1], x.device)
    best_run: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for redo in range(1 if given is not None else nredo):
        start = given if given is not None else _seeded_init(x, k, seed + redo, init)
        run = _torch_kmeans_once(x, k, niter, start, verbose)
        if best_run is None or run[2] > best_run[2]:
            best_run = run
    assert best_run is not None
    return best_run[0], best_run[1]


# --------------------------------------------------------------------------- public API


def pick_backend(on_cuda: bool, backend: str = "auto") -> str:
    """Where spherical_kmeans runs for data on a CUDA device (on_cuda) or on the CPU: 'faiss' (FAISS on the
    CPU), 'faiss-gpu' (a FAISS GPU build that sees a GPU: data on the GPU) or 'torch' (on the data's device:
    no FAISS, or CUDA data and a CPU-only FAISS under 'auto'). Raises ImportError for backend='faiss'
    without FAISS, ValueError for an unknown backend."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    faiss = import_faiss()
    if faiss is None:
        if backend == "faiss":
            raise ImportError("backend='faiss' requested but faiss is not installed")
        return "torch"
    if on_cuda:
        if faiss_has_gpu(faiss):
            return "faiss-gpu"
        # Data already on the GPU and FAISS is CPU-only: clustering on the GPU with torch
        # avoids a host round trip and is much faster than FAISS on CPU.
        return "faiss" if backend == "faiss" else "torch"
    return "faiss"


def _faiss_spherical(
    t: torch.Tensor,
    k: int,
    *,
    niter: int,
    seed: int,
    nredo: int,
    given: torch.Tensor | None,
    init: str,
    verbose: bool,
    gpu: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """FAISS spherical k-means on L2-normalised t (init centres computed on t's device)."""
    xn = np.ascontiguousarray(t.cpu().numpy(), dtype=np.float32)

    def run(start: torch.Tensor | None, run_seed: int, run_nredo: int):
        start_np = None if start is None else np.ascontiguousarray(start.cpu().numpy(), np.float32)
        return _faiss_kmeans(xn, k, niter=niter, seed=run_seed, nredo=run_nredo, spherical=True,
                             init_centroids=start_np, verbose=verbose, gpu=gpu)

    if given is not None:
        # Restarting FAISS from the same given centres would just continue the same run.
        labels, cents, _ = run(given, seed, 1)
    elif init == "random":
        labels, cents, _ = run(None, seed, nredo)  # FAISS's native random init and restarts
    else:
        # Same seeded k-means++ centres as the torch backend, so both backends agree; this also
        # works on FAISS versions that predate ClusteringParameters.init_method.
        best = None
        for redo in range(nredo):
            res = run(_seeded_init(t, k, seed + redo, "kmeans++"), seed + redo, 1)
            if best is None or res[2] > best[2]:
                best = res
        labels, cents, _ = best
    # FAISS renormalises centroids when spherical=True; repeat it to be exact in float32.
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), _EPS)
    return labels, cents


def spherical_kmeans(
    x: Any,
    k: int,
    *,
    niter: int = 50,
    seed: int = 0,
    nredo: int = 1,
    init_centroids: Any = None,
    verbose: bool = False,
    init: str = "kmeans++",
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (cosine similarity) of the rows of x.

    Args:
        x: (N, D) torch tensor (any device) or numpy array; rows are L2-normalised first.
        k: number of clusters, 1 <= k <= N.
        niter: k-means iterations (0 keeps ``init_centroids`` and only assigns).
        seed: RNG seed; results are deterministic on CPU for a fixed seed.
        nredo: restarts, keeping the best objective (ignored with ``init_centroids``).
        init_centroids: optional (k, D) initial centres (normalised before use).
        init: 'kmeans++' (seeded, computed in torch, shared by both backends) or 'random'
            (FAISS's own default: k random points).
        backend: 'auto' (FAISS, FAISS-GPU for CUDA tensors when available, else torch on the
            tensor's device), 'faiss' or 'torch'.

    Returns:
        labels: int64 numpy array (N,); centroids: float32 numpy array (k, D), unit-norm rows.
    """
    t = _as_float_tensor(x)
    n, d = t.shape
    k = _check_k(k, n)
    if niter < 0 or nredo < 1:
        raise ValueError(f"need niter >= 0 and nredo >= 1, got niter={niter}, nredo={nredo}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    which = pick_backend(t.is_cuda, backend)
    t = F.normalize(t, dim=1, eps=_EPS)
    given = _prepare_init(init_centroids, k, d, t.device)

    if which == "torch":
        labels, cents = torch_spherical_kmeans(
            t, k, niter=niter, seed=seed, nredo=nredo, init_centroids=given, init=init, verbose=verbose
        )
        return labels.cpu().numpy().astype(np.int64), cents.cpu().numpy().astype(np.float32)
    return _faiss_spherical(t, k, niter=niter, seed=seed, nredo=nredo, given=given, init=init,
                            verbose=verbose, gpu=which == "faiss-gpu")


def euclidean_kmeans(
    x: Any,
    k: int,
    *,
    init_centroids: Any = None,
    n_init: int = 1,
    max_iter: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """scikit-learn's KMeans (Lloyd, squared Euclidean distance) on x (N, D) as given (no normalisation here):
    the readout of MIX'EM's public code (cluster_eval.py). init_centroids (k, D): the starting centres, used
    as they are (one run, n_init must be 1); None: k-means++ seeded by `seed`, best inertia of n_init runs.
    Returns the assignments (N,) int64 of every row to its nearest final centre (KMeans.predict). Runs on the
    CPU (x is copied to host memory as float32)."""
    from sklearn.cluster import KMeans

    t = _as_float_tensor(x)
    k = _check_k(k, t.shape[0])
    data = t.cpu().numpy()
    if init_centroids is not None:
        init = _as_float_tensor(init_centroids, "init_centroids").cpu().numpy()
        if init.shape != (k, data.shape[1]):
            raise ValueError(f"init_centroids must have shape ({k}, {data.shape[1]}), got {init.shape}")
        if n_init != 1:
            raise ValueError(f"n_init must be 1 with init_centroids (one run from the given centres), got {n_init}")
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=max_iter, random_state=seed)
    else:
        km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed)
    return km.fit(data).predict(data).astype(np.int64)


def kmeans_raw_pixels(
    images_uint8: Any, k: int, seed: int = 0, *, nredo: int = 10, niter: int = 50
) -> np.ndarray:
    """Baseline: Euclidean k-means (FAISS; on the GPU with a FAISS GPU build) on flattened raw pixels in [0, 1].

    ``images_uint8`` is (N, ...) uint8 (any layout, e.g. NHWC or NCHW), numpy or torch.
    Float inputs are taken as already scaled. Every point is used (no subsampling).
    Returns int64 labels (N,).
    """
    if isinstance(images_uint8, torch.Tensor):
        images_uint8 = images_uint8.detach().cpu().numpy()
    a = np.asarray(images_uint8)
    if a.ndim < 2 or a.shape[0] < 1:
        raise ValueError(f"images must have shape (N, ...) with N >= 1, got {a.shape}")
    if a.dtype == np.uint8:
        x = a.reshape(a.shape[0], -1).astype(np.float32) / 255.0
    elif np.issubdtype(a.dtype, np.floating):
        x = a.reshape(a.shape[0], -1).astype(np.float32)
    else:
        raise ValueError(f"images must be uint8 (or float already in [0, 1]), got dtype {a.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("images contain NaN or inf values")
    k = _check_k(k, x.shape[0])
    labels, _, _ = _faiss_kmeans(
        np.ascontiguousarray(x),
        k,
        niter=niter,
        seed=seed,
        nredo=nredo,
        spherical=False,
        init_centroids=None,
        verbose=False,
        gpu=faiss_has_gpu(import_faiss()),   # FAISS-GPU where installed: raw pixels are large (N x 3072)
    )
    return labels
