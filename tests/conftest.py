import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"

# Tests compare runs bit for bit on the CPU; keep the thread count fixed so reductions are ordered alike.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_overrides(out_dir, **extra):
    """A MiCE run small enough for a unit test: 8 px digits, a 4-channel ResNet-10, a queue of 64."""
    o = {"data.image_size": 8, "model.width": 4, "model.embed_dim": 16, "model.queue_size": 64,
         "optim.batch_size": 32, "optim.epochs": 2, "optim.lr_steps": "[1]", "optim.warmup_epochs": 0.5,
         "train.out_dir": str(out_dir), "train.progress": "false", "train.checkpoint_every": 1,
         "train.log_every": 2, "eval.kmeans_niter": 5, "eval.pixel_baseline": "false"}
    o.update(extra)
    return [f"--{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="session")
def digits_small():
    """320 of the bundled digits at 8 px (stratified by taking the first 320)."""
    from fastmice.data.sources import load_digits
    ds = load_digits(8)
    return ds.subset(torch.arange(320))


def make_folder(root, classes=3, per_class=24, size=(20, 20), seed=0):
    """class folders of random-coloured JPEGs (sizes may differ: `size` is a list then)"""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            w, h = size[i % len(size)] if isinstance(size, list) else size
            base = rng.integers(0, 256, 3) * (c + 1) % 256
            img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=90)
    return root
