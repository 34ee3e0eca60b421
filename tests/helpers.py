"""Helpers shared by the tests (the fixtures are in conftest.py)."""
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastmice.cli import main
from fastmice.config import load_config
from fastmice.data.sources import load_digits
from fastmice.engine.trainer import Trainer

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


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_trainer(tmp_path, dataset, name, **extra):
    cfg = load_config("digits", tiny_overrides(tmp_path, **{"train.run_name": name, **extra}))
    return Trainer(cfg, tmp_path / name, dataset)


def assert_same_state(a: Trainer, b: Trainer):
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    assert (a.epoch, a.global_step) == (b.epoch, b.global_step)


def write_digit_folder(root: Path, n: int, labelled: bool) -> Path:
    """The first n bundled digits as 8 px PNGs: root/<label>/<i>.png, or flat with a nested subfolder."""
    ds = load_digits(8)
    for i in range(n):
        folder = root / str(int(ds.labels[i])) if labelled else root / ("nested" if i % 2 else ".")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


def tiny_run(base: Path, labelled: bool = True) -> Path:
    """A run trained once per test session (reused through its folder under the session's temp dir):
    labelled = 320 digits in class folders, K=10; unlabelled = 48 loose digits, K=3."""
    name = "labelled" if labelled else "unlabelled"
    run = base / f"fastmice-{name}" / "run"
    if (run / "checkpoint.pt").is_file():
        return run
    root = write_digit_folder(run.parent / "images", 320 if labelled else 48, labelled)
    extra = {} if labelled else {"method.num_clusters": 3, "method.queue_size": 32, "optim.batch_size": 16}
    args = ["train", "--run-dir", str(run), "--data.source=folder", f"--data.root={root}"]
    assert main(args + tiny_overrides(run.parent, **extra)) == 0
    return run
