"""PNG plots of clustering results (confusion matrix, cluster sizes).

matplotlib is imported inside the functions, and figures are drawn on a bare Agg canvas
(no pyplot): importing fastmice stays fast, nothing needs a display, and no global pyplot
state or backend is touched in the caller's process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["plot_confusion", "plot_cluster_sizes", "matched_column_order"]

_ANNOTATE_MAX = 20  # annotate cell counts only up to 20 x 20, beyond that they are unreadable
_TICKS_MAX = 50  # beyond this many rows/columns the tick labels overlap


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    fig.clear()  # a bare Figure is not registered with pyplot; clearing frees its artists now
    return path


def matched_column_order(conf: np.ndarray) -> np.ndarray:
    """Column permutation putting the Hungarian-matched cluster of class i in column i.

    Clusters matched to no class (more clusters than classes) follow, largest first. With
    fewer clusters than classes the matched columns keep the order of their classes.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(conf, maximize=True)
    matched = cols[np.argsort(rows)]
    rest = np.setdiff1d(np.arange(conf.shape[1]), matched)
    rest = rest[np.argsort(-conf[:, rest].sum(axis=0), kind="stable")]
    return np.concatenate([matched, rest]).astype(np.int64)


def plot_confusion(
    conf: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Heatmap of a (classes x clusters) count matrix with columns in matched order; saves a PNG."""
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.size == 0:
        raise ValueError(f"conf must be a non-empty 2-D matrix, got shape {conf.shape}")
    n_cls, n_clu = conf.shape
    if class_names is not None and len(class_names) != n_cls:
        raise ValueError(f"{len(class_names)} class names for {n_cls} classes")
    order = matched_column_order(conf)
    shown = conf[:, order]

    fig = new_figure(min(2 + 0.45 * n_clu, 30), min(1.5 + 0.45 * n_cls, 30))
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap="Blues", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("cluster (Hungarian-matched order)")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n_clu <= _TICKS_MAX:
        ax.set_xticks(range(n_clu), [str(c) for c in order], rotation=90 if n_clu > 10 else 0)
    if n_cls <= _TICKS_MAX:
        labels = list(class_names) if class_names is not None else [str(i) for i in range(n_cls)]
        ax.set_yticks(range(n_cls), labels)
    if max(n_cls, n_clu) <= _ANNOTATE_MAX:
        _annotate(ax, shown)
    return save_figure(fig, path)


def _annotate(ax: Any, counts: np.ndarray) -> None:
    """Write each count in its cell, white on dark cells so it stays legible."""
    top = counts.max() if counts.size and counts.max() > 0 else 1
    for (i, j), v in np.ndenumerate(counts):
        colour = "white" if v > 0.5 * top else "black"
        ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=7, color=colour)


def plot_cluster_sizes(sizes: Any, path: str | Path, title: str = "") -> Path:
    """Bar chart of cluster sizes sorted largest first, with the uniform size as a line; saves a PNG."""
    sizes = np.asarray(sizes).ravel()
    if sizes.size == 0:
        raise ValueError("sizes is empty")
    order = np.argsort(-sizes, kind="stable")
    ordered = sizes[order]
    k = sizes.size

    fig = new_figure(min(3 + 0.12 * k, 16), 3.5)
    ax = fig.add_subplot()
    ax.bar(np.arange(k), ordered, width=1.0 if k > 50 else 0.8, color="tab:blue")
    ax.axhline(sizes.sum() / k, color="tab:red", linestyle="--", linewidth=1, label="uniform")
    if k <= 30:  # small k: name the clusters under their bars
        ax.set_xticks(range(k), [str(c) for c in order], fontsize=7)
    empty = int((sizes == 0).sum())
    ax.set_xlabel(f"clusters sorted by size (k={k}, empty={empty})")
    ax.set_ylabel("points")
    ax.set_title(title)
    ax.legend(loc="upper right")
    return save_figure(fig, path)
