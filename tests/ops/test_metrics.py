"""Tests for fastmice.ops.metrics, fastmice.ops.kmeans and fastmice.eval.plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmice.ops.kmeans import kmeans_raw_pixels, spherical_kmeans, torch_spherical_kmeans
from fastmice.ops.metrics import cluster_metrics, cluster_sizes, confusion_matrix, hungarian_mapping
from fastmice.eval.plots import matched_column_order, plot_cluster_sizes, plot_confusion


# --------------------------------------------------------------------------- helpers


def sphere_blobs(k: int, per: int, d: int = 32, noise: float = 0.05, seed: int = 0):
    """k tight, well-separated blobs on the unit sphere: (x float32 (k*per, d), y int64)."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(k, d, generator=g), dim=1)
    y = torch.arange(k).repeat_interleave(per)
    x = F.normalize(means[y] + noise * torch.randn(len(y), d, generator=g), dim=1)
    return x, y, means


# --------------------------------------------------------------------------- metrics


def test_perfect_clustering_with_permuted_labels():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    perm = {0: 2, 1: 0, 2: 1}
    y_pred = np.array([perm[c] for c in y_true])
    m = cluster_metrics(y_true, y_pred)
    assert m == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0, "acc_many_to_one": 1.0})
    assert hungarian_mapping(y_true, y_pred) == {2: 0, 0: 1, 1: 2}


def test_known_small_case_by_hand():
    # Cluster 1 = {0,1} (class 0), cluster 0 = {2,3,4,5} (one class-0 point, three class-1).
    # Best matching 1->0, 0->1 gets 2 + 3 = 5 of 6 right.
    y_true = [0, 0, 0, 1, 1, 1]
    y_pred = [1, 1, 0, 0, 0, 0]
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(5 / 6)
    assert m["acc_many_to_one"] == pytest.approx(5 / 6)
    assert hungarian_mapping(y_true, y_pred) == {1: 0, 0: 1}
    assert 0 < m["nmi"] < 1 and m["ari"] < 1
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), [[1, 2], [3, 0]])


def test_confusion_matrix_shape_arguments():
    conf = confusion_matrix([0, 1], [0, 0], num_classes=3, num_clusters=4)
    assert conf.shape == (3, 4) and conf.sum() == 2 and conf[0, 0] == 1 and conf[1, 0] == 1
    with pytest.raises(ValueError, match="num_clusters"):
        confusion_matrix([0, 1], [0, 5], num_clusters=3)


def test_overclustering_and_many_to_one():
    # 2 classes split into 4 pure clusters: Hungarian can only match 2 clusters.
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(0.5)  # unmatched clusters count as wrong
    assert m["acc_many_to_one"] == pytest.approx(1.0)
    mapping = hungarian_mapping(y_true, y_pred)
    assert len(mapping) == 2 and set(mapping.values()) == {0, 1}


def test_underclustering_and_sparse_labels():
    # Fewer clusters than classes, with arbitrary (negative, non-contiguous) cluster ids.
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([-1, -1, 7, 7, 7, 7])
    m = cluster_metrics(y_true, y_pred)
    assert m["acc"] == pytest.approx(4 / 6)
    assert hungarian_mapping(y_true, y_pred)[-1] == 0


def test_torch_inputs_and_float_labels():
    y_true = torch.tensor([0, 0, 1, 1, 2, 2])
    y_pred = torch.tensor([1, 1, 2, 2, 0, 0])
    assert cluster_metrics(y_true, y_pred)["acc"] == pytest.approx(1.0)
    assert cluster_metrics(y_true.float(), y_pred.numpy().tolist())["ari"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        ([0, 1, 1], [0, 1], "different lengths"),
        ([], [], "empty"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0.5, 1.0], [0, 1], "integer"),
        (["a", "b"], [0, 1], "integer"),
    ],
)
def test_metric_validation(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        cluster_metrics(y_true, y_pred)


def test_cluster_sizes():
    np.testing.assert_array_equal(cluster_sizes([0, 2, 2, 2], 4), [1, 0, 3, 0])
    with pytest.raises(ValueError, match="range"):
        cluster_sizes([0, 4], 4)


# --------------------------------------------------------------------------- spherical k-means


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_spherical_kmeans_recovers_blobs(backend):
    x, y, _ = sphere_blobs(k=8, per=100)
    labels, cents = spherical_kmeans(x * 3.0, 8, nredo=3, seed=0, backend=backend)  # scale-free
    assert labels.dtype == np.int64 and labels.shape == (800,)
    assert cents.dtype == np.float32 and cents.shape == (8, 32)
    assert cluster_metrics(y, labels)["acc"] == 1.0
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_spherical_kmeans_deterministic(backend):
    x, _, _ = sphere_blobs(k=6, per=50, noise=0.5, seed=1)  # overlapping: many local optima
    a = spherical_kmeans(x.numpy(), 6, seed=3, nredo=2, niter=10, backend=backend)
    b = spherical_kmeans(x.numpy(), 6, seed=3, nredo=2, niter=10, backend=backend)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_faiss_random_init_runs():
    x, y, _ = sphere_blobs(k=4, per=100, seed=2)
    labels, cents = spherical_kmeans(x, 4, init="random", nredo=5, seed=0)
    assert cluster_metrics(y, labels)["acc"] == 1.0
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)


def test_no_subsampling_centroid_is_normalised_mean():
    # 300 points per centroid exceeds FAISS's default cap of 256: all must be used.
    k = 4
    x, y, _ = sphere_blobs(k=k, per=300, d=16, noise=0.3, seed=4)
    labels, cents = spherical_kmeans(x, k, nredo=2, niter=30, seed=0, backend="faiss")
    assert labels.shape == (300 * k,) and labels.min() >= 0 and labels.max() < k
    xn = x.numpy()
    for c in range(k):
        mean = xn[labels == c].mean(axis=0)
        np.testing.assert_allclose(cents[c], mean / np.linalg.norm(mean), atol=1e-4)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_init_centroids_respected(backend):
    x, y, means = sphere_blobs(k=5, per=40, seed=5)
    order = torch.tensor([3, 0, 4, 1, 2])  # cluster j must start on blob order[j]
    init = means[order] * 2.0  # not unit norm: only the direction should matter
    expected = torch.argsort(order)[y].numpy()
    labels0, cents0 = spherical_kmeans(x, 5, niter=0, init_centroids=init, backend=backend)
    np.testing.assert_array_equal(labels0, expected)
    np.testing.assert_allclose(cents0, means[order].numpy(), atol=1e-5)
    labels1, _ = spherical_kmeans(x, 5, niter=1, init_centroids=init, backend=backend)
    np.testing.assert_array_equal(labels1, expected)


def test_torch_fallback_agrees_with_faiss():
    x, y, _ = sphere_blobs(k=10, per=60, d=24, seed=6)
    lf, cf = spherical_kmeans(x, 10, nredo=3, seed=0, backend="faiss")
    lt, ct = spherical_kmeans(x, 10, nredo=3, seed=0, backend="torch")
    assert cluster_metrics(y, lf)["acc"] == 1.0
    assert cluster_metrics(y, lt)["acc"] == 1.0
    # Same seeded k-means++ start, so the two backends give the same partition.
    assert cluster_metrics(lf, lt)["acc"] == 1.0
    # The torch function itself returns tensors on the input's device.
    labels, cents = torch_spherical_kmeans(x, 10, nredo=3, seed=0)
    assert labels.dtype == torch.int64 and cents.shape == (10, 24)


def test_kmeans_edge_cases_and_errors():
    x, _, _ = sphere_blobs(k=3, per=4, d=8)
    labels, cents = spherical_kmeans(x, 1)
    assert (labels == 0).all() and cents.shape == (1, 8)
    labels, _ = spherical_kmeans(x, 12)  # k == N: every point its own cluster
    assert len(set(labels.tolist())) == 12
    with pytest.raises(ValueError, match="K too large"):
        spherical_kmeans(x, 13)
    with pytest.raises(ValueError, match="positive"):
        spherical_kmeans(x, 0)
    bad = x.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        spherical_kmeans(bad, 2)
    with pytest.raises(ValueError, match="2-D"):
        spherical_kmeans(x[0], 2)
    with pytest.raises(ValueError, match="init_centroids"):
        spherical_kmeans(x, 2, init_centroids=np.ones((3, 8), np.float32))
    with pytest.raises(ValueError, match="backend"):
        spherical_kmeans(x, 2, backend="sklearn")


def test_kmeans_raw_pixels_on_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8) like real images
    labels = kmeans_raw_pixels(images, 10, seed=0)
    assert labels.shape == (len(images),) and labels.dtype == np.int64
    assert cluster_metrics(digits.target, labels)["acc"] > 0.7
    with pytest.raises(ValueError, match="uint8"):
        kmeans_raw_pixels(images.astype(np.int32), 10)


# --------------------------------------------------------------------------- plots


def _check_png(path, min_w: int = 50, min_h: int = 50):
    from PIL import Image

    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_w and im.size[1] >= min_h


def test_matched_column_order():
    conf = np.array([[0, 9, 1, 0], [8, 0, 0, 2], [0, 0, 7, 3]])
    np.testing.assert_array_equal(matched_column_order(conf), [1, 0, 2, 3])


def test_plots_write_png(tmp_path):
    y_true = np.repeat(np.arange(4), 25)
    y_pred = (y_true + 1) % 5
    y_pred[:5] = 4
    conf = confusion_matrix(y_true, y_pred)
    p1 = plot_confusion(conf, tmp_path / "a" / "conf.png", class_names=list("wxyz"), title="t")
    p2 = plot_cluster_sizes(cluster_sizes(y_pred, 6), tmp_path / "b" / "c" / "sizes.png", title="s")
    big = np.random.default_rng(0).integers(0, 50, size=(30, 40))  # no annotations past 20x20
    p3 = plot_confusion(big, tmp_path / "big.png")
    for p in (p1, p2, p3):
        _check_png(p)
