"""MiCE training throughput: the naive reference and the fast step side by side, in one run, on the same data.

    python bench/bench_train.py [--config cifar10] [--batch-size 256] [--steps 50] [--warmup 10]
        [--data synthetic | jpeg | DIR] [--workers 16] [--compile off|default|reduce-overhead|...]
        [--single-pass] [--arch resnet34] [--width 64] [--override section.key=value ...] [--json OUT]

Paths (same config, same images, same initial weights):
  naive   naive: per-sample transforms (torchvision.transforms if it imports, else augment_batch on one
          image at a time) in a CPU DataLoader with --workers processes, then fp32 NCHW eager naive_step (student
          run separately on x_f and x_g, per-parameter SGD and EMA, host-side queue pointer, loss.item()).
  fast    the Trainer: uint8 images resident on the device, batched augmentation (Trainer.views), train_step
          (bf16 autocast and channels_last on CUDA, fused/foreach optimizer, foreach EMA, train.compile).
  dali    the same Trainer with data.loader=dali (--paths naive,fast,dali): a folder's files read, decoded (nvJPEG
          on a GPU) and augmented by DALI every epoch, nothing decoded up front; synthetic data goes through
          DALI's external_source. Its model phase is the fast path's (the same step), so it is not repeated.
Phases, each timed after --warmup untimed steps and ended with a device synchronisation:
  end_to_end   data + step, as training runs
  data         the views only (naive: DataLoader batches copied to the device; fast: Trainer.views)
  model        the step only, on one pre-made batch of views reused every step
samples/s counts source images (each brings its 3 views); step ms = seconds per step. Peak memory: on CUDA
torch.cuda.max_memory_allocated during the phase (reset before it); on the CPU the peak resident set size of
this process during the phase (Linux VmHWM after resetting it through /proc/self/clear_refs; DataLoader
workers are other processes and not counted; without /proc, ru_maxrss: the peak since the process started).
The peak includes everything resident (the dataset, both paths' models); "of which the phase's" is the peak
minus what was allocated (CUDA) or resident (CPU) when the phase started: its own working memory.
With --data DIR (or `jpeg`: ../shared/datasets/cifar10-jpeg/train) the naive loader decodes the files in its
workers (ImageFolder-style) while the fast path decodes them once up front (not timed; reported).
CPU runs with tiny settings (--arch resnet10 --width 8 --batch-size 16 --steps 3) are smoke tests, not speed
results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JPEG = REPO.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class PeakMemory:
    """Peak memory of one phase: CUDA allocator peak, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base_mb: float | None = None
        self.kind = "cuda_max_memory_allocated"
        if device.type != "cuda":
            self.kind = "cpu_peak_rss" if self._reset_hwm() else "cpu_ru_maxrss_since_start"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            if self.kind == "cpu_peak_rss":
                self._reset_hwm()
            rss = self._status_kb("VmRSS")
            self.base_mb = rss / 1024 if rss is not None else None

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        kb = self._status_kb("VmHWM") if self.kind == "cpu_peak_rss" else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # kB on Linux
        return kb / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device, mem: PeakMemory) -> tuple[float, float]:
    """(seconds for `steps` calls of fn after `warmup` untimed calls, peak memory MB over the timed calls;
    mem.base_mb is what was resident when they started)."""
    for _ in range(warmup):
        fn()
    sync(device)
    mem.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t0, mem.peak_mb()


def _streamed(dataset, image_size: int | None):
    """The decoded folder's files as a dataset streamed from disk (data.loader=dali reads them every epoch)."""
    from fastmice.data.sources import ImageDataset
    from fastmice.data.stream import FileImages
    return ImageDataset(FileImages(dataset.paths, image_size or dataset.images.shape[-1]), dataset.labels,
                        dataset.class_names, dataset.name, dataset.paths)


def load_images(args, image_size: int | None):
    """(ImageDataset for the fast path, source for the naive loader: a CPU uint8 tensor or a file list, note)."""
    from fastmice.data.sources import ImageDataset

    if args.data == "synthetic":
        gen = torch.Generator().manual_seed(0)
        side = image_size or 32
        images = torch.randint(0, 256, (args.num_images, 3, side, side), dtype=torch.uint8, generator=gen)
        return ImageDataset(images, None, None, "synthetic"), images, f"synthetic uint8 {tuple(images.shape)}"
    root = DEFAULT_JPEG if args.data == "jpeg" else Path(args.data)
    from fastmice.data.folder import list_folder_images, load_image_folder
    files, _, _ = list_folder_images([root.resolve()], None)
    if args.limit and args.limit < len(files):
        files = files[::len(files) // args.limit][:args.limit]
    t0 = time.perf_counter()
    ds = load_image_folder(root, image_size=image_size, num_workers=min(16, os.cpu_count() or 1), progress=False)
    if len(files) < len(ds):
        keep = {f: i for i, f in enumerate(ds.paths)}
        ds = ds.subset(torch.tensor([keep[f] for f in files if f in keep]))
    files = ds.paths
    return ds, files, f"{len(files)} files from {root} (fast path decoded them once in {time.perf_counter() - t0:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", default="cifar10", help="bundled config name or YAML file (default cifar10)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (256 for cifar10)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (default 50 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 1 CPU; the "
                   "fast path's first step compiles under --compile)")
    p.add_argument("--arch", default=None, help="resnet34 | resnet18 | resnet10 (default: the config's)")
    p.add_argument("--width", type=int, default=None, help="channels of the first stage (default: the config's)")
    p.add_argument("--data", default="synthetic", help="synthetic | jpeg (the CIFAR-10 JPEG train folder) | DIR")
    p.add_argument("--limit", type=int, default=None, help="with a folder: use this many files")
    p.add_argument("--num-images", type=int, default=None,
                   help="synthetic: how many 32 px images (default: max(queue size, 4 batches))")
    p.add_argument("--workers", type=int, default=None, help="naive DataLoader workers (default: cores, max 16)")
    p.add_argument("--compile", default=None, help="the fast path's train.compile (default: the config's)")
    p.add_argument("--single-pass", action="store_true", help="fast path: x_f and x_g in one student pass")
    p.add_argument("--phases", default="data,model,end_to_end", help="comma-separated subset of the phases")
    p.add_argument("--paths", default="naive,fast", help="comma-separated subset of naive,fast,dali")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config setting, for both paths (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)

    from fastmice.config import load_config
    from naive import NaiveViews, naive_copy, naive_loader, naive_optimizer, naive_step
    from fastmice.engine.trainer import Trainer, learning_rate, resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    overrides = [o if o.startswith("--") else f"--{o}" for o in args.override]
    overrides += [f"--train.device={device}", "--train.progress=false"]
    for key, value in (("optim.batch_size", args.batch_size), ("model.arch", args.arch),
                       ("model.width", args.width), ("train.compile", args.compile)):
        if value is not None:
            overrides.append(f"--{key}={value}")
    cfg = load_config(args.config, overrides)
    if args.data == "synthetic" and args.num_images is None:
        args.num_images = max(cfg.method.queue_size, 4 * cfg.optim.batch_size)
    dataset, source, data_note = load_images(args, cfg.data.image_size)
    notes = [data_note]
    if cfg.method.queue_size > len(dataset):
        notes.append(f"method.queue_size {cfg.method.queue_size} capped at the {len(dataset)} images")
        overrides.append(f"--method.queue_size={len(dataset)}")
    if args.single_pass:
        overrides.append("--method.single_pass=true")
    cfg = load_config(args.config, overrides)
    bs = cfg.optim.batch_size
    phases = [x for x in args.phases.split(",") if x]
    paths = [x for x in args.paths.split(",") if x]
    if set(paths) - {"naive", "fast", "dali"}:
        p.error(f"--paths: unknown {sorted(set(paths) - {'naive', 'fast', 'dali'})}; choose from naive,fast,dali")

    run_dir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, run_dir, dataset)              # the fast path
    naive_cfg = load_config(args.config, [o for o in overrides if not o.startswith("--method.single_pass")])
    naive = naive_copy(trainer.method)                     # same initial weights, fp32 NCHW
    if args.single_pass:
        naive.single_pass = False
    naive_opt = naive_optimizer(naive_cfg, naive)
    spe = trainer.feed.steps_per_epoch
    lr = learning_rate(cfg, 0, 0, spe)
    crop = trainer.crop_size
    views_ds = NaiveViews(source, cfg.augment, crop, cfg.data.mean, cfg.data.std, num_views=3,
                          image_size=cfg.data.image_size)
    notes.append(f"naive transforms: {views_ds.kind}; {workers} DataLoader workers")
    dali = None
    if "dali" in paths:   # the same config and initial weights, its batches from DALI
        dali_ds = dataset if args.data == "synthetic" else _streamed(dataset, cfg.data.image_size)
        dali = Trainer(load_config(args.config, overrides + ["--data.loader=dali"]), run_dir / "dali", dali_ds)
        dali.method.load_state_dict(trainer.method.state_dict())
        notes.append(f"dali: {dali_ds.images!r}" if args.data != "synthetic" else "dali: external_source")
    mem = PeakMemory(device)
    print(f"device {device_name(device)}, torch {torch.__version__}, commit {commit()}; config {args.config}: "
          f"{cfg.backbone.arch} width {cfg.backbone.width}, K={cfg.method.num_clusters}, V={cfg.method.queue_size}, "
          f"batch {bs}, crop {crop}; fast: amp {trainer.precision.view_dtype}, channels_last "
          f"{trainer.precision.channels_last}, compile {cfg.train.compile}, single_pass {cfg.method.single_pass}, "
          f"optimizer {'fused' if trainer.optimizer.param_groups[0].get('fused') else 'foreach' if trainer.optimizer.param_groups[0].get('foreach') else 'loop'}; "
          f"{steps} timed steps after {warmup} per phase")
    for n in notes:
        print(f"  {n}")

    # The DataLoader's workers start with a burst (each one prefetches 2 batches): warm up past it so that the
    # timed steps see the steady state, not batches made while the previous phase's clock was stopped.
    loader_warmup = max(warmup, 2 * workers)

    def naive_batches():
        loader = naive_loader(views_ds, bs, workers, num_samples=bs * (steps + loader_warmup + 1),
                              seed=cfg.train.seed, pin_memory=gpu)
        return iter(loader)

    def to_device(batch):
        return [v.to(device, non_blocking=True) for v in batch]

    fixed_views = None   # one batch of views for the model-only phases: fp32 NCHW (naive) and the fast copy

    def fixed():
        nonlocal fixed_views
        if fixed_views is None:
            trainer.feed.start_epoch()
            _, x = trainer.feed.batches.next_batch()
            gen = torch.Generator(device=device).manual_seed(1)
            from fastmice.views.augment import augment_batch
            v32 = [augment_batch(x, cfg.augment, crop, trainer.feed.spec.mean, trainer.feed.spec.std, generator=gen) for _ in range(3)]
            fmt = torch.channels_last if trainer.precision.channels_last else torch.contiguous_format
            fixed_views = (v32, [v.to(trainer.precision.view_dtype).contiguous(memory_format=fmt) for v in v32])
        return fixed_views

    results = []

    def record(path: str, phase: str, secs: float, peak: float) -> None:
        extra = None if mem.base_mb is None else max(peak - mem.base_mb, 0.0)
        row = {"path": path, "phase": phase, "samples_per_s": steps * bs / secs, "step_ms": 1000 * secs / steps,
               "peak_mem_mb": peak, "phase_mem_mb": extra}
        results.append(row)
        print(f"  {path:5s} {phase:10s} {row['samples_per_s']:10.1f} samples/s {row['step_ms']:9.2f} ms/step "
              f"peak {peak:8.1f} MB" + ("" if extra is None else f" ({extra:.1f} MB above the phase's start)"))

    for phase in phases:
        for path in paths:
            if path == "naive":
                if phase == "data":
                    it = naive_batches()
                    secs, peak = timed(lambda: to_device(next(it)), steps, loader_warmup, device, mem)
                elif phase == "model":
                    v32 = fixed()[0]
                    secs, peak = timed(lambda: naive_step(naive, naive_opt, *v32, lr=lr), steps, warmup, device, mem)
                else:
                    it = naive_batches()
                    secs, peak = timed(lambda: naive_step(naive, naive_opt, *to_device(next(it)), lr=lr),
                                       steps, loader_warmup, device, mem)
            elif path == "fast":
                if phase == "data":
                    def fast_views():
                        if trainer.feed.epoch_done:
                            trainer.feed.start_epoch()
                        _, x = trainer.feed.batches.next_batch()
                        trainer.feed.advance()
                        return trainer.feed.views(x)
                    secs, peak = timed(fast_views, steps, warmup, device, mem)
                elif phase == "model":
                    views = fixed()[1]
                    secs, peak = timed(lambda: trainer.step(views, None, lr), steps, warmup, device, mem)
                else:
                    secs, peak = timed(lambda: trainer.run_steps(1), steps, warmup, device, mem)
            elif path == "dali":
                if phase == "data":
                    def dali_views():
                        if dali.feed.epoch_done:
                            dali.feed.start_epoch()
                        views, _ = dali.feed.next_views()
                        dali.feed.advance()
                        return views
                    secs, peak = timed(dali_views, steps, warmup, device, mem)
                elif phase == "model":
                    continue
                else:
                    secs, peak = timed(lambda: dali.run_steps(1), steps, warmup, device, mem)
            record(path, phase, secs, peak)

    ratios, dali_ratios = {}, {}
    for phase in phases:
        rate = {r["path"]: r["samples_per_s"] for r in results if r["phase"] == phase}
        if "naive" in rate and "fast" in rate:
            ratios[phase] = rate["fast"] / rate["naive"]
        if "naive" in rate and "dali" in rate:
            dali_ratios[phase] = rate["dali"] / rate["naive"]
    print(f"\n| path | phase | samples/s | step ms | peak MB ({mem.kind}) | of which the phase's |\n"
          f"|---|---|---|---|---|---|")
    for r in results:
        extra = "-" if r["phase_mem_mb"] is None else f"{r['phase_mem_mb']:,.0f}"
        print(f"| {r['path']} | {r['phase']} | {r['samples_per_s']:,.1f} | {r['step_ms']:.2f} | "
              f"{r['peak_mem_mb']:,.0f} | {extra} |")
    print("\nfast / naive: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if dali_ratios:
        print("dali / naive: " + ", ".join(f"{k} {v:.2f}x" for k, v in dali_ratios.items()))
    if trainer.compile_info:
        print(f"compile ({trainer.compile_info['mode']}): first step {trainer.compile_info.get('seconds') or 0:.1f} s, "
              f"graph breaks {trainer.compile_info.get('graph_breaks')}")

    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "settings": {"config": args.config, "arch": cfg.backbone.arch, "width": cfg.backbone.width,
                     "num_clusters": cfg.method.num_clusters, "queue_size": cfg.method.queue_size, "batch_size": bs,
                     "crop_size": crop, "steps": steps, "warmup": warmup, "workers": workers, "data": args.data,
                     "num_images": len(dataset), "compile": cfg.train.compile, "single_pass": cfg.method.single_pass,
                     "fast_amp": str(trainer.precision.view_dtype), "channels_last": trainer.precision.channels_last,
                     "naive_transforms": views_ds.kind},
        "memory_kind": mem.kind, "results": results, "ratios": ratios,
        "dali_ratios": dali_ratios, "compile": trainer.compile_info,
        "notes": notes,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
