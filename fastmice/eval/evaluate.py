"""Evaluation of a trained run on un-augmented images (normalise only).

Three readouts: argmax posterior (queue frozen at its checkpointed state, nothing enqueued), argmax of the
gating prior, and spherical k-means on the gating embeddings. ACC/NMI/ARI when labels exist; assignments,
cluster sizes and pictures in any case.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmice.core import distributed
from fastmice.core.checkpoint import atomic_write_text
from fastmice.config import Config
from fastmice.data.sources import ImageDataset, load_dataset
from fastmice.eval.inference import infer_dataset
from fastmice.eval.plots import plot_cluster_sizes, plot_confusion
from fastmice.eval.run import load_run
from fastmice.methods import Method
from fastmice.ops.kmeans import kmeans_raw_pixels
from fastmice.ops.metrics import cluster_metrics, cluster_sizes, confusion_matrix

def confidences(probs: torch.Tensor | None, n: int) -> np.ndarray:
    """Max cluster probability where the method has probabilities; else 1 (k-means assignments are hard)."""
    if probs is not None:
        return probs.max(1).values.cpu().numpy()
    return np.ones(n, dtype=np.float32)


def evaluate_model(model: Method, dataset: ImageDataset, cfg: Config, device: torch.device, run_dir: Path,
                   crop_size: int, autocast=None, channels_last: bool = False) -> dict[str, Any]:
    """Evaluate the method's readouts (primary first); write eval.json, assignments.csv and the PNGs into
    run_dir; return the results."""

    # Several processes (torchrun): each infers its share of the images, rank 0 alone evaluates and writes.
    out = infer_dataset(model, dataset.images, cfg, device, crop_size, autocast, channels_last,
                        progress=cfg.train.progress and distributed.is_main(), sharded=True)
    if not distributed.is_main():
        return {"method": cfg.method.name, "readouts": {}, "skipped": "evaluated on rank 0"}
    k = cfg.method.num_clusters
    # One class (or none) cannot be clustered meaningfully: ACC/NMI/ARI would read 100 whatever the model does.
    scored = dataset.labels is not None and len(torch.unique(dataset.labels)) >= 2
    preds = model.readouts(out, cfg.eval, cfg.train.seed)
    primary = next(iter(preds))
    probs = model.cluster_probabilities(out)
    confidence = confidences(probs, len(dataset))
    result: dict[str, Any] = {"method": cfg.method.name, "num_images": len(dataset), "num_clusters": k,
                              "num_classes": dataset.num_classes,
                              "primary": primary, "readouts": {}}
    for name, pred in preds.items():
        entry: dict[str, Any] = {"cluster_sizes": cluster_sizes(pred, k).tolist()}
        if scored:
            entry.update({m: float(v) for m, v in cluster_metrics(dataset.labels.numpy(), pred).items()})
        result["readouts"][name] = entry
    if dataset.labels is not None and not scored:
        result["note"] = ("the labels hold a single class: ACC/NMI/ARI are not meaningful and are not reported "
                          "(the folder needs images of at least two classes)")
    if probs is not None:   # k-means assignments are hard: no confidence to report
        result["confidence"] = {"mean": float(confidence.mean()), "median": float(np.median(confidence))}
    if scored and cfg.eval.linear_probe:
        result["linear_probe"] = linear_probe(out["features"], dataset.labels, seed=cfg.train.seed)
    # A folder streamed from disk (FileImages) is not decoded whole for a baseline: it can be any size.
    if scored and cfg.eval.pixel_baseline and isinstance(dataset.images, torch.Tensor):
        base = kmeans_raw_pixels(dataset.images, dataset.num_classes or k, seed=cfg.train.seed)
        result["pixel_kmeans"] = {m: float(v) for m, v in cluster_metrics(dataset.labels.numpy(), base).items()}

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2), run_dir / "eval.json")   # never half an eval.json
    _write_assignments(run_dir / "assignments.csv", dataset, preds, confidence)
    plot_cluster_sizes(np.asarray(result["readouts"][primary]["cluster_sizes"]),
                       run_dir / "cluster_sizes.png", title=f"{cfg.name}: cluster sizes ({primary})")
    if scored:
        conf = confusion_matrix(dataset.labels.numpy(), preds[primary], num_clusters=k)
        plot_confusion(conf, run_dir / "confusion.png", class_names=dataset.class_names,
                       title=f"{cfg.name}: classes x clusters ({primary})")
    return result


def _write_assignments(path: Path, dataset: ImageDataset, preds: dict[str, np.ndarray],
                       confidence: np.ndarray) -> None:
    names = list(preds)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "path", "label", "cluster", "confidence"] + [f"cluster_{n}" for n in names[1:]])
        labels = dataset.labels.numpy() if dataset.labels is not None else None
        for i in range(len(dataset)):
            w.writerow([i, dataset.paths[i] if dataset.paths else "", "" if labels is None else int(labels[i]),
                        int(preds[names[0]][i]), f"{confidence[i]:.4f}"] + [int(preds[n][i]) for n in names[1:]])


def linear_probe(features: torch.Tensor, labels: torch.Tensor, seed: int = 0, train_frac: float = 0.8) -> dict:
    """Top-1 accuracy of a logistic regression on frozen, L2-normalised features (seeded 80/20 split)."""
    from sklearn.linear_model import LogisticRegression

    x = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
    y = labels.cpu().numpy()
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(train_frac * len(y))
    clf = LogisticRegression(max_iter=1000, C=10.0)
    clf.fit(x[perm[:cut]], y[perm[:cut]])
    return {"accuracy": float(clf.score(x[perm[cut:]], y[perm[cut:]])), "train": cut, "test": len(y) - cut}


def format_results(result: dict[str, Any]) -> str:
    """A small table: one row per readout (and the pixel baseline), ACC/NMI/ARI in percent; then the primary
    readout's ACC against the pixel baseline, its cluster sizes (and a note when one looks like two classes
    merged), the notes and the mean confidence. Lines of text, no trailing newline."""
    rows = []
    readouts = result["readouts"]
    if not readouts:
        return result.get("skipped", "no readouts")
    primary = result.get("primary", next(iter(readouts)))
    if "acc" in readouts[primary]:
        # K other than the number of classes (overclustering, Appendix F): Hungarian ACC leaves the unmatched
        # clusters as errors, so many-to-one ACC (each cluster votes for its majority class) goes beside it.
        m2o = result.get("num_classes") not in (None, result.get("num_clusters"))
        rows.append(f"{'readout':<24}{'ACC':>8}{'NMI':>8}{'ARI':>8}" + (f"{'M2O ACC':>9}" if m2o else ""))
        named = list(readouts.items()) + ([("k-means on raw pixels", result["pixel_kmeans"])]
                                          if "pixel_kmeans" in result else [])
        for name, e in named:
            rows.append(f"{name:<24}{100 * e['acc']:8.2f}{100 * e['nmi']:8.2f}{100 * e['ari']:8.2f}"
                        + (f"{100 * e['acc_many_to_one']:9.2f}" if m2o and "acc_many_to_one" in e else ""))
        if "pixel_kmeans" in result:
            gain = 100 * (readouts[primary]["acc"] - result["pixel_kmeans"]["acc"])
            rows.append(f"{primary} ACC {100 * readouts[primary]['acc']:.2f} against "
                        f"{100 * result['pixel_kmeans']['acc']:.2f} for k-means on raw pixels: {gain:+.2f} points")
    else:
        rows.append("no labels: ACC/NMI/ARI need labels")
    rows += cluster_size_lines(readouts[primary].get("cluster_sizes"), primary, "acc" in readouts[primary])
    if "note" in result:
        rows.append(f"note: {result['note']}")
    if "linear_probe" in result:
        rows.append(f"linear probe accuracy {100 * result['linear_probe']['accuracy']:.2f}")
    if "confidence" in result:
        rows.append(f"mean confidence {result['confidence']['mean']:.3f}")
    return "\n".join(rows)


MERGED_SHARE = 1.6   # a cluster this many times an even share (N / K) or more: say that classes may be merged


def cluster_size_lines(sizes: list[int] | None, readout: str, labelled: bool = False) -> list[str]:
    """The readout's cluster sizes, largest first, against an even share N/K; a note when the largest holds
    MERGED_SHARE times an even share or more (two classes in one cluster, the usual failure, shows so)."""
    if not sizes:
        return []
    n, k = sum(sizes), len(sizes)
    ordered = sorted(sizes, reverse=True)
    lines = [f"cluster sizes ({readout}), largest first: {' '.join(str(s) for s in ordered)} "
             f"(an even split: {n / k:.0f} each)"]
    if k > 1 and ordered[0] >= MERGED_SHARE * n / k:
        lines.append(f"note: the largest cluster holds {ordered[0] * k / n:.1f}x an even share and the smallest "
                     f"{ordered[-1] * k / n:.2f}x: two classes may share one cluster"
                     + (" (confusion.png shows which)" if labelled else ""))
    return lines


def evaluate_run(run_dir: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`fastmice eval RUN`: rebuild the model from the run's checkpoint and evaluate it on its dataset."""
    run = load_run(run_dir, device, overrides)
    dataset = load_dataset(run.cfg.data)
    return evaluate_model(run.model, dataset, run.cfg, run.device, run.run_dir, run.crop_size, run.autocast,
                          run.channels_last)
