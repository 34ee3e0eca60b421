"""Evaluation during training: the `eval.probe_every` probe and the `eval.embed_every` embedding snapshots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmice.core import distributed
from fastmice.data.dataset import ImageDataset
from fastmice.eval.evaluate import linear_probe
from fastmice.eval.inference import infer_dataset
from fastmice.methods import Method
from fastmice.ops.metrics import cluster_metrics


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    """A fixed, seeded, sorted choice of min(size, n) indices: the same images in every snapshot."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def probe(method: Method, dataset: ImageDataset, cfg: Any, device: torch.device, crop_size: int, precision: Any
          ) -> dict[str, Any]:
    """ACC/NMI/ARI of every readout and the linear probe, without writing files. Several processes: all call it
    and infer their share of the images; rank 0 gets the scores, the others {}."""
    out = infer_dataset(method, dataset.images, cfg, device, crop_size, precision.autocast,
                        precision.channels_last, sharded=True)
    if not distributed.is_main():
        return {}
    labels = dataset.labels.numpy()
    result = {name: {m: float(v) for m, v in cluster_metrics(labels, pred).items()}
              for name, pred in method.readouts(out, cfg.eval, cfg.train.seed).items()}
    if cfg.eval.linear_probe:
        result["linear_probe"] = linear_probe(out["features"], dataset.labels, seed=cfg.train.seed)
    return result


def save_embedding_snapshot(method: Method, dataset: ImageDataset, cfg: Any, device: torch.device, crop_size: int,
                            precision: Any, path: Path) -> Path | None:
    """`path` (.npz): embedding, cluster (the primary readout) and label of a fixed seeded subsample, for the
    t-SNE figures of `fastmice report`. Rank 0 only (returns None elsewhere)."""
    if not distributed.is_main():
        return None
    idx = subsample(len(dataset), cfg.eval.embed_samples, cfg.train.seed)
    out = infer_dataset(method, dataset.images[torch.from_numpy(idx)], cfg, device, crop_size, precision.autocast,
                        precision.channels_last)
    cluster = next(iter(method.readouts(out, cfg.eval, cfg.train.seed).values()))
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels[torch.from_numpy(idx)].numpy() if dataset.labels is not None else None
    np.savez_compressed(path, index=idx, embedding=out["embedding"].float().cpu().numpy(), cluster=cluster,
                        **({"label": labels} if labels is not None else {}))
    return path
