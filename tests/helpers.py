"""Helpers shared by the tests (the fixtures are in conftest.py)."""
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, Iterator

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
    method = o.get("method", o.get("method.name", "mice"))
    if method not in ("mice", "moco"):
        o.pop("method.queue_size")          # a queue only where the method has one
    if method == "mice":                    # the paper's prior from step 0: a 10-epoch ramp would hold these
        o.setdefault("method.prior_ramp_epochs", 0)   # 2-epoch runs near uniform (test_prior_warmup tests it)
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


# ---- wandb offline runs, read back ----------------------------------------------------------------------
# wandb 0.31 writes an offline run (RUN/wandb/offline-run-<time>-<id>/) as one binary file, run-<id>.wandb, and
# no files/wandb-summary.json or files/config.yaml (those appear only online); it ships no public reader of that
# file either (the Python `datastore` module of older versions is gone). The file is a LevelDB-style log: a 7-byte
# header (b":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each `<uint32 crc><uint16 length>
# <uint8 type>` + payload (type 1 whole, 2/3/4 first/middle/last part of a record), the tail of a block shorter
# than a chunk header zero-padded. Each record is a `wandb.proto.wandb_internal_pb2.Record`: `run` (id, config),
# `history` (one wandb.log call: items of nested_key + value_json), `summary`, `metric` (define_metric), `exit`.

WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
WANDB_BLOCK = 32 * 1024
WANDB_CHUNK_HEADER = 7


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf Records of a run-<id>.wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:len(WANDB_HEADER)] == WANDB_HEADER, f"{path}: not a wandb log file (header {data[:7]!r})"
    pos, parts = len(WANDB_HEADER), b""
    while pos + WANDB_CHUNK_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_CHUNK_HEADER:   # padding at the end of a block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + WANDB_CHUNK_HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload = data[pos + WANDB_CHUNK_HEADER:pos + WANDB_CHUNK_HEADER + length]
        pos += WANDB_CHUNK_HEADER + length
        if kind == 1:
            yield pb.Record.FromString(payload)
        elif kind == 2:
            parts = payload
        elif kind == 3:
            parts += payload
        elif kind == 4:
            yield pb.Record.FromString(parts + payload)


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_offline_run(folder: Path) -> dict[str, Any]:
    """{"id", "name", "group", "tags", "config" (top-level keys, values decoded), "history" (one dict per wandb.log call, W&B's own
    _-keys dropped, histograms as {"_type", "values", "bins"}), "summary" (the last value of each key)}."""
    files = list(Path(folder).glob("run-*.wandb"))
    assert len(files) == 1, f"{folder}: expected one run-*.wandb, found {files}"
    out: dict[str, Any] = {"id": None, "config": {}, "history": [], "summary": {}}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, name=rec.run.display_name, group=rec.run.run_group,
                       tags=list(rec.run.tags))
            out["config"] = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                names = list(item.nested_key) or [item.key]
                if names[0].startswith("_"):
                    continue
                if len(names) > 1 and names[-1] in ("_type", "values", "bins"):   # a histogram's fields
                    row.setdefault("/".join(names[:-1]), {})[names[-1]] = json.loads(item.value_json)
                else:
                    row[_key(item)] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "summary":
            for u in rec.summary.update:
                out["summary"][_key(u)] = json.loads(u.value_json)
    return out


def stop_during(t: Trainer, k: int, sig: int) -> None:
    """Deliver `sig` while global step k (1-based) of trainer `t` runs, as a user's Ctrl-C or a scheduler's
    SIGTERM would: the step finishes, then the trainer checkpoints and stops."""
    import signal
    original = t.step

    def step(views, index, lr):
        out = original(views, index, lr)
        if t.global_step + 1 == k:
            signal.raise_signal(sig)
        return out
    t.step = step
