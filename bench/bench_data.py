"""Throughput of the data paths: images/s for N augmented views (MoCo v1) of CIFAR-10 JPEGs.

    python bench/bench_data.py [--data DIR] [--batch 256] [--views 3] [--steps N] [--limit N] [--dtype float32]

Paths (each yields num_views normalised (B, 3, 32, 32) views per batch on the device):
  dali_files          fastmice.views.dali.dali_file_loader: readers.file + decoders.image("mixed") + GPU augmentation
  dali_files_fused    the same with color="fused" (one color_twist instead of the exact jitter chain)
  dali_memory         fastmice.views.dali.dali_memory_loader: external_source from device-resident uint8 images
  torch_device        fastmice.views.augment.augment_batch on device-resident uint8 images (what the trainer does)
An images/s figure counts source images; each brings --views augmented views. On a GPU the DALI paths use
device 0 and the timings end with a synchronisation; without a GPU everything runs on the CPU with small
counts (DALI's CPU operators), which says nothing about GPU speed. Without DALI the DALI rows are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fastmice.views.augment import MOCO_V1, augment_batch
from fastmice.views.dali import dali_available

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DEFAULT_DATA = [Path("/tmp/data/cifar10-jpeg/train"),
                Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "train"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loader(loader, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` batches after `warmup` batches, running across epochs as needed."""
    def batches():
        while True:
            yield from loader
    it = batches()
    for _ in range(warmup):
        b = next(it)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    _sync(device)
    assert len(b.views) == loader.num_views
    return time.perf_counter() - t0


def _time_torch(images: torch.Tensor, batch: int, views: int, steps: int, warmup: int, dtype: torch.dtype,
                device: torch.device) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    mean = torch.tensor(CIFAR_MEAN, device=device)
    std = torch.tensor(CIFAR_STD, device=device)
    n = images.shape[0]

    def step(i):
        idx = torch.randint(0, n, (batch,), device=device, generator=gen)
        x = images[idx]
        return [augment_batch(x, MOCO_V1, 32, mean, std, generator=gen, out_dtype=dtype) for _ in range(views)]

    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="ImageFolder root of CIFAR-10 JPEGs (train split)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed batches (default: 300 on a GPU, 8 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: 30 GPU, 2 CPU)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only this many files (default: all on a GPU, 2048 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: cores, at most 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--paths", nargs="*", default=["dali_files", "dali_files_fused", "dali_memory", "torch_device"])
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    device_id = 0 if gpu else None
    steps = args.steps or (300 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (30 if gpu else 2)
    limit = args.limit or (None if gpu else 2048)
    threads = args.threads or min(8, os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    data = args.data or next((d for d in DEFAULT_DATA if d.is_dir()), None)
    if data is None or not data.is_dir():
        print("no CIFAR-10 JPEG folder found; pass --data (e.g. /tmp/data/cifar10-jpeg/train)")
        return 1

    from fastmice.data.folder import list_folder_images
    files, labels, _ = list_folder_images([data.resolve()], None)
    if limit is not None and limit < len(files):
        stride = len(files) // limit
        files, labels = files[::stride][:limit], labels[::stride][:limit]
    print(f"{len(files)} images from {data}, batch {args.batch}, {args.views} views, {args.dtype}, "
          f"device {torch.cuda.get_device_name(0) if gpu else 'cpu'}, torch {torch.__version__}, "
          f"{steps} timed steps after {warmup}, DALI threads {threads}")

    # The in-memory paths decode once with PIL (what load_image_folder does).
    images = None
    if {"dali_memory", "torch_device"} & set(args.paths):
        from PIL import Image
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            arrays = list(pool.map(lambda f: np.asarray(Image.open(f).convert("RGB")), files))
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)
        print(f"decoded into memory in {time.perf_counter() - t0:.1f} s: {tuple(images.shape)} uint8 on {device}")

    rows = []
    common = dict(batch_size=args.batch, crop_size=32, num_views=args.views, mean=CIFAR_MEAN, std=CIFAR_STD,
                  device_id=device_id, num_threads=threads, out_dtype=dtype)
    for path in args.paths:
        if path.startswith("dali") and not dali_available():
            rows.append((path, None, "DALI not installed"))
            continue
        try:
            t0 = time.perf_counter()
            if path in ("dali_files", "dali_files_fused"):
                from fastmice.views.dali import dali_file_loader
                color = "fused" if path.endswith("fused") else "exact"
                loader = dali_file_loader(files=files, labels=labels, color=color, **common)
            elif path == "dali_memory":
                from fastmice.views.dali import dali_memory_loader
                loader = dali_memory_loader(images, **common)
            elif path == "torch_device":
                loader = None
            else:
                rows.append((path, None, "unknown path"))
                continue
            build = time.perf_counter() - t0
            if loader is None:
                secs = _time_torch(images, args.batch, args.views, steps, warmup, dtype, device)
            else:
                secs = _time_loader(loader, steps, warmup, device)
                loader.close()
            rows.append((path, steps * args.batch / secs, f"{1000 * secs / steps:.2f} ms/batch, build {build:.1f} s"))
        except Exception as e:  # noqa: BLE001 - report and go on with the other paths
            rows.append((path, None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))

    print(f"\n| path | images/s | notes |\n|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {'-' if rate is None else f'{rate:,.0f}'} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
