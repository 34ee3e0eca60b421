"""Helpers shared by the tests (the fixtures are in conftest.py)."""
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"


def tiny_overrides(out_dir, **extra):
    """A MiCE run small enough for a unit test: 8 px digits, a 4-channel ResNet-10, a queue of 64."""
    o = {"data.image_size": 8, "backbone.width": 4, "method.embed_dim": 16, "method.queue_size": 64,
         "optim.batch_size": 32, "optim.epochs": 2, "optim.lr_steps": "[1]", "optim.warmup_epochs": 0.5,
         "train.out_dir": str(out_dir), "train.progress": "false", "train.checkpoint_every": 1,
         "train.log_every": 2, "eval.kmeans_niter": 5, "eval.pixel_baseline": "false"}
    o.update(extra)
    if o.get("method", o.get("method.name", "mice")) not in ("mice", "moco"):
        o.pop("method.queue_size")          # a queue only where the method has one
    return [f"--{k}={v}" for k, v in o.items()]


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
