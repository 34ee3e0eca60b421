"""Clustering metrics: Hungarian accuracy, NMI, ARI, many-to-one accuracy.

All functions accept numpy arrays, Python lists or torch tensors (on any device).
scipy / scikit-learn are imported lazily so that ``import fastmice`` stays fast.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cluster_metrics", "hungarian_mapping", "confusion_matrix", "cluster_sizes"]


def _to_label_array(a: Any, name: str) -> np.ndarray:
    """Convert a label container to a 1-D int64 numpy array, validating it."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, any device
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        # Labels stored as floats (e.g. 1.0) are fine as long as they are whole numbers.
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must contain integer labels, got non-integer values")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must contain integer labels, got dtype {arr.dtype}")


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _to_label_array(y_true, "y_true")
    p = _to_label_array(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and y_pred have different lengths: {t.shape[0]} != {p.shape[0]}")
    return t, p


def confusion_matrix(
    y_true: Any,
    y_pred: Any,
    num_classes: int | None = None,
    num_clusters: int | None = None,
) -> np.ndarray:
    """Contingency table: ``conf[c, k]`` = number of samples of class c put in cluster k.

    Labels must be non-negative; the shape is ``(num_classes, num_clusters)``, defaulting to
    ``max label + 1`` on each axis.
    """
    t, p = _check_pair(y_true, y_pred)
    if t.min() < 0 or p.min() < 0:
        raise ValueError("confusion_matrix needs non-negative labels")
    n_cls = int(t.max()) + 1 if num_classes is None else int(num_classes)
    n_clu = int(p.max()) + 1 if num_clusters is None else int(num_clusters)
    if t.max() >= n_cls:
        raise ValueError(f"y_true has label {t.max()} >= num_classes={n_cls}")
    if p.max() >= n_clu:
        raise ValueError(f"y_pred has label {p.max()} >= num_clusters={n_clu}")
    # One bincount over the flattened (class, cluster) index is far faster than np.add.at.
    flat = np.bincount(t * n_clu + p, minlength=n_cls * n_clu)
    return flat.reshape(n_cls, n_clu)


def _compact_confusion(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confusion matrix over the labels actually present (handles negative / sparse ids)."""
    classes, t_idx = np.unique(t, return_inverse=True)
    clusters, p_idx = np.unique(p, return_inverse=True)
    conf = confusion_matrix(t_idx, p_idx, len(classes), len(clusters))
    return conf, classes, clusters


def _match(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight matching of rows (classes) to columns (clusters); rectangular is fine."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(conf, maximize=True)


def hungarian_mapping(y_true: Any, y_pred: Any) -> dict[int, int]:
    """Best one-to-one map cluster id -> class id (Hungarian on the contingency table).

    With more clusters than classes, the unmatched clusters are absent from the dict
    (they count as errors in the accuracy).
    """
    t, p = _check_pair(y_true, y_pred)
    conf, classes, clusters = _compact_confusion(t, p)
    rows, cols = _match(conf)
    return {int(clusters[c]): int(classes[r]) for r, c in zip(rows, cols)}


def cluster_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """ACC (Hungarian), NMI (arithmetic), ARI and many-to-one ACC, all as fractions."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, p = _check_pair(y_true, y_pred)
    n = t.shape[0]
    conf, _, _ = _compact_confusion(t, p)
    rows, cols = _match(conf)
    return {
        "acc": float(conf[rows, cols].sum() / n),
        "nmi": float(normalized_mutual_info_score(t, p, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(t, p)),
        # Each cluster votes for its majority class: meaningful under overclustering.
        "acc_many_to_one": float(conf.max(axis=0).sum() / n),
    }


def cluster_sizes(y_pred: Any, k: int) -> np.ndarray:
    """Number of samples in each of the k clusters (int64 array of length k, zeros included)."""
    p = _to_label_array(y_pred, "y_pred")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if p.min() < 0 or p.max() >= k:
        raise ValueError(f"cluster labels must lie in [0, {k}), got range [{p.min()}, {p.max()}]")
    return np.bincount(p, minlength=k).astype(np.int64)
