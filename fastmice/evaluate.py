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

from fastmice.augment import normalize_batch
from fastmice.checkpoint import load_checkpoint
from fastmice.config import Config, config_from_dict
from fastmice.data.sources import ImageDataset, load_dataset
from fastmice.kmeans import kmeans_raw_pixels, spherical_kmeans
from fastmice.metrics import cluster_metrics, cluster_sizes, confusion_matrix
from fastmice.models.mice import MiCE

READOUTS = ("posterior", "gating", "kmeans")


@torch.no_grad()
def infer_dataset(model: MiCE, images: torch.Tensor, cfg: Config, device: torch.device,
                  crop_size: int, autocast=None, channels_last: bool = False,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Run model.infer over uint8 images (N, 3, H, W) in batches; outputs stay on `device`."""
    from tqdm.auto import tqdm

    model.eval()
    mean = torch.tensor(cfg.data.mean, device=device)
    std = torch.tensor(cfg.data.std, device=device)
    outs: dict[str, list[torch.Tensor]] = {}
    bs = cfg.eval.batch_size
    for start in tqdm(range(0, images.shape[0], bs), desc="evaluating", disable=not progress, leave=False):
        x = images[start:start + bs].to(device, non_blocking=True)
        x = normalize_batch(x, mean, std, out_size=crop_size, channels_last=channels_last)
        with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            out = model.infer(x)
        for k, v in out.items():
            outs.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in outs.items()}


def predictions(out: dict[str, torch.Tensor], k: int, cfg: Config) -> dict[str, np.ndarray]:
    g = out["g"]
    km_labels, _ = spherical_kmeans(g, k, niter=cfg.eval.kmeans_niter, seed=cfg.train.seed)
    return {"posterior": out["posterior"].argmax(1).cpu().numpy(),
            "gating": out["gating"].argmax(1).cpu().numpy(),
            "kmeans": np.asarray(km_labels)}


def evaluate_model(model: MiCE, dataset: ImageDataset, cfg: Config, device: torch.device, run_dir: Path,
                   crop_size: int, autocast=None, channels_last: bool = False) -> dict[str, Any]:
    """Evaluate, write eval.json, assignments.csv and the PNGs into run_dir; return the results."""
    from fastmice.plots import plot_cluster_sizes, plot_confusion

    k = cfg.model.num_clusters
    out = infer_dataset(model, dataset.images, cfg, device, crop_size, autocast, channels_last,
                        progress=cfg.train.progress)
    preds = predictions(out, k, cfg)
    confidence = out["posterior"].max(1).values.cpu().numpy()
    result: dict[str, Any] = {"num_images": len(dataset), "num_clusters": k, "readouts": {}}
    for name, pred in preds.items():
        entry: dict[str, Any] = {"cluster_sizes": cluster_sizes(pred, k).tolist()}
        if dataset.labels is not None:
            entry.update({m: float(v) for m, v in cluster_metrics(dataset.labels.numpy(), pred).items()})
        result["readouts"][name] = entry
    result["posterior_confidence"] = {"mean": float(confidence.mean()), "median": float(np.median(confidence))}
    if dataset.labels is not None and cfg.eval.pixel_baseline:
        base = kmeans_raw_pixels(dataset.images, dataset.num_classes or k, seed=cfg.train.seed)
        result["pixel_kmeans"] = {m: float(v) for m, v in cluster_metrics(dataset.labels.numpy(), base).items()}

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    _write_assignments(run_dir / "assignments.csv", dataset, preds, confidence)
    plot_cluster_sizes(np.asarray(result["readouts"]["posterior"]["cluster_sizes"]),
                       run_dir / "cluster_sizes.png", title=f"{cfg.name}: cluster sizes (argmax posterior)")
    if dataset.labels is not None:
        conf = confusion_matrix(dataset.labels.numpy(), preds["posterior"], num_clusters=k)
        plot_confusion(conf, run_dir / "confusion.png", class_names=dataset.class_names,
                       title=f"{cfg.name}: classes x clusters (argmax posterior)")
    return result


def _write_assignments(path: Path, dataset: ImageDataset, preds: dict[str, np.ndarray],
                       confidence: np.ndarray) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "path", "label", "cluster", "confidence", "cluster_gating", "cluster_kmeans"])
        labels = dataset.labels.numpy() if dataset.labels is not None else None
        for i in range(len(dataset)):
            w.writerow([i, dataset.paths[i] if dataset.paths else "", "" if labels is None else int(labels[i]),
                        int(preds["posterior"][i]), f"{confidence[i]:.4f}", int(preds["gating"][i]),
                        int(preds["kmeans"][i])])


def format_results(result: dict[str, Any]) -> str:
    """A small table: one row per readout (and the pixel baseline), ACC/NMI/ARI in percent."""
    rows = []
    has_labels = "acc" in next(iter(result["readouts"].values()))
    if has_labels:
        rows.append(f"{'readout':<22}{'ACC':>8}{'NMI':>8}{'ARI':>8}")
        for name, e in result["readouts"].items():
            rows.append(f"{name:<22}{100 * e['acc']:8.2f}{100 * e['nmi']:8.2f}{100 * e['ari']:8.2f}")
        if "pixel_kmeans" in result:
            e = result["pixel_kmeans"]
            rows.append(f"{'k-means on raw pixels':<22}{100 * e['acc']:8.2f}{100 * e['nmi']:8.2f}{100 * e['ari']:8.2f}")
    else:
        rows.append("no labels: cluster sizes (argmax posterior) "
                    + str(result["readouts"]["posterior"]["cluster_sizes"]))
    rows.append(f"mean posterior confidence {result['posterior_confidence']['mean']:.3f}")
    return "\n".join(rows)


def evaluate_run(run_dir: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`fastmice eval RUN`: rebuild the model from the run's checkpoint and evaluate it on its dataset."""
    from fastmice.train import build_model, precision_for, resolve_device

    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir)
    values = state["config"]
    for section, keys in (overrides or {}).items():
        values[section].update(keys)
    cfg = config_from_dict(values)
    dev = resolve_device(device)
    dataset = load_dataset(cfg.data)
    model = build_model(cfg, state["image_size"])
    model.load_state_dict(state["model"])
    model.to(dev)
    prec = precision_for(cfg, dev)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    crop = cfg.data.crop_size or state["image_size"]
    autocast = prec.autocast if prec.view_dtype == torch.bfloat16 else None
    return evaluate_model(model, dataset, cfg, dev, run_dir, crop, autocast, prec.channels_last)
