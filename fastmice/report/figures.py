"""The MiCE paper's figures for any run: ACC/NMI/ARI per epoch, t-SNE of the gating embeddings coloured by
cluster and by class (Fig. 2, 4, 5), the posterior histograms of the first and last epochs (Fig. 3, left)
and the predicted cluster sizes (Fig. 3, right, drawn by fastmice.eval.plots).

Inputs come from the run folder: `metrics.jsonl` (epoch records carry `posterior_hist`, the 10-bin histogram
of every posterior value q_k of the epoch's training samples; eval records come from eval.probe_every) and
`embeddings/epoch_NNNN.npz` (eval.embed_every: the embeddings of a fixed subsample, saved while training).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fastmice.eval.plots import new_figure, save_figure
from fastmice.eval.probe import subsample  # noqa: F401  (the snapshots' subsample, re-exported)

METRIC_NAMES = {"acc": "ACC", "nmi": "NMI", "ari": "ARI"}


def plot_metric_curves(evals: list[dict[str, Any]], path: Path) -> Path | None:
    """ACC, NMI and ARI (%) per evaluated epoch, one panel each, a line per readout."""
    from matplotlib.ticker import MaxNLocator

    if not evals:
        return None
    readouts = [n for n, v in evals[-1].items() if isinstance(v, dict) and "acc" in v]
    if not readouts:
        return None
    fig = new_figure(15, 3.4)
    fig.set_layout_engine("constrained")
    x = [r["epoch"] for r in evals]
    for i, (key, name) in enumerate(METRIC_NAMES.items()):
        ax = fig.add_subplot(1, 3, i + 1)
        for readout in readouts:
            y = [100 * r[readout][key] if readout in r and key in r[readout] else np.nan for r in evals]
            ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=readout.replace("_", " "))
        ax.set_title(f"{name} % per epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_posterior_histograms(epochs: list[dict[str, Any]], path: Path) -> Path | None:
    """Fig. 3 (left): the share of posterior values q_k in each of 10 bins over [0, 1], first vs last epoch."""
    rows = [r for r in epochs if r.get("posterior_hist")]
    if not rows:
        return None
    picked = [rows[0]] if len(rows) == 1 else [rows[0], rows[-1]]
    fig = new_figure(6.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    bins = len(picked[0]["posterior_hist"])
    width = 0.8 / len(picked)
    for j, r in enumerate(picked):
        h = np.asarray(r["posterior_hist"], dtype=np.float64)
        ax.bar(np.arange(bins) + (j - (len(picked) - 1) / 2) * width, h / max(h.sum(), 1), width,
               label=f"epoch {r['epoch']}")
    ax.set_xticks(np.arange(bins))
    ax.set_xticklabels([f"[{i / bins:.1f},{(i + 1) / bins:.1f})" for i in range(bins)], rotation=45, fontsize=7)
    ax.set_xlabel("posterior probability interval")
    ax.set_ylabel("share of q_k values")
    ax.set_title("approximate posterior, first and last epoch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def tsne(x: np.ndarray, perplexity: float = 200.0, seed: int = 0) -> np.ndarray:
    """2-d t-SNE of the rows of x (the paper uses perplexity 200); the perplexity is capped below n / 3, the
    most the neighbour search allows."""
    from sklearn.manifold import TSNE

    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}")
    p = float(min(perplexity, (n - 1) / 3))
    return TSNE(n_components=2, perplexity=p, init="pca", random_state=seed).fit_transform(x.astype(np.float32))


def read_snapshots(run_dir: Path, limit: int = 3) -> list[dict[str, Any]]:
    """Up to `limit` embedding snapshots of RUN/embeddings (the first, the last and evenly between)."""
    files = sorted((run_dir / "embeddings").glob("epoch_*.npz"))
    if len(files) > limit:
        keep = np.unique(np.linspace(0, len(files) - 1, limit).round().astype(int))
        files = [files[i] for i in keep]
    out = []
    for f in files:
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files} | {"epoch": int(f.stem.split("_")[1])})
    return out


def _scatter(ax, xy: np.ndarray, colour: np.ndarray, title: str) -> None:
    k = int(colour.max()) + 1 if colour.size else 1
    cmap = "tab10" if k <= 10 else "tab20" if k <= 20 else "nipy_spectral"
    ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap=cmap, s=3, linewidths=0, vmin=0, vmax=max(k - 1, 1))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_tsne(snapshots: list[dict[str, Any]], path: Path, perplexity: float = 200.0, seed: int = 0) -> Path | None:
    """Fig. 4 / 5: one column per snapshot, coloured by predicted cluster (top) and by true class (bottom,
    when labels exist). Each snapshot holds `embedding` (n, D), `cluster` (n,) and optionally `label` (n,)."""
    if not snapshots:
        return None
    labelled = all("label" in s and s["label"].size for s in snapshots)
    rows, cols = (2 if labelled else 1), len(snapshots)
    fig = new_figure(4 * cols, 4 * rows)
    for j, s in enumerate(snapshots):
        xy = tsne(s["embedding"], perplexity, seed)
        name = f"epoch {s['epoch']}" if s.get("epoch") is not None else "final"
        _scatter(fig.add_subplot(rows, cols, j + 1), xy, s["cluster"], f"{name}: coloured by cluster")
        if labelled:
            _scatter(fig.add_subplot(rows, cols, cols + j + 1), xy, s["label"], f"{name}: coloured by class")
    fig.suptitle(f"t-SNE of the embeddings (perplexity {min(perplexity, (len(snapshots[0]['embedding']) - 1) / 3):g}, "
                 f"{len(snapshots[0]['embedding'])} images)")
    return save_figure(fig, path)
