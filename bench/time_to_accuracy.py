"""Time to accuracy: MiCE on an image folder for a wall-clock budget, then ACC / NMI / ARI.

    python bench/time_to_accuracy.py [--minutes 8] [--config cifar10] [--data DIR] [--splits train,test]
        [--compile reduce-overhead] [--override section.key=value ...] [--json OUT] [--run-dir DIR]

Default data: the 60,000 CIFAR-10 JPEGs (../shared/datasets/cifar10-jpeg, train and test together as the
paper does), decoded once onto the device (not counted in the budget; reported). The budget starts with the
first training step, so it includes compiling (train.compile) and the warm-up:

1. one step (compiles, if train.compile is on), then --warmup-steps timed steps: the rate in steps/s;
2. the schedule is compressed to the steps that fit in what is left of the budget: optim.epochs becomes the
   whole number of epochs that fit (at least 1; less than one epoch fits: a partial one), optim.lr_steps and
   optim.warmup_epochs shrink in proportion (the paper's x0.1 at 480/640/800 of 1000 epochs become the same
   fractions of the new length), train.max_steps is set to the planned steps as a hard stop, and a timer stops
   training at the end of the budget whatever the estimate said;
3. the Trainer trains (its own loop, end-of-epoch mu updates included), then fastmice.eval.evaluate.evaluate_model
   evaluates every readout on the whole dataset (not counted in the budget; reported).

Printed (and with --json, written): ACC/NMI/ARI of each readout, samples seen (steps x batch), epochs, the
wall time of training, the estimated rate, compile time, load and evaluation times, device, date and commit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import commit, device_name  # noqa: E402  (bench/ is a folder of scripts, not a package)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"


def compressed_schedule(optim, epochs: int) -> tuple[list[int], float]:
    """optim.lr_steps and optim.warmup_epochs scaled from optim.epochs to `epochs` (each step at >= 1)."""
    scale = epochs / optim.epochs
    steps = sorted({min(max(1, round(s * scale)), epochs) for s in optim.lr_steps})
    return steps, optim.warmup_epochs * scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of training (default 8)")
    p.add_argument("--config", default="cifar10", help="bundled config name or YAML file (default cifar10)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (ImageFolder layout)")
    p.add_argument("--splits", default="train,test", help="sub-folders to train on together ('' for none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default=None, help="train.compile for the run (default: the config's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="timed steps of the rate estimate "
                   "(default 30 on a GPU, 3 on the CPU; never past the first epoch)")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config setting (repeatable), applied last")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/tta-<config>-<date>")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes must be > 0")

    from fastmice.config import load_config
    from fastmice.eval.evaluate import evaluate_model, format_results
    from fastmice.engine.trainer import Trainer

    budget = 60.0 * args.minutes
    splits = [s for s in args.splits.split(",") if s]
    overrides = ["--data.source=folder", f"--data.root={args.data}", f"--train.device={args.device}",
                 "--train.progress=false", f"--data.num_workers={min(16, os.cpu_count() or 1)}"]
    if splits:
        overrides.append(f"--data.splits=[{','.join(splits)}]")
    if args.compile is not None:
        overrides.append(f"--train.compile={args.compile}")
    overrides += [o if o.startswith("--") else f"--{o}" for o in args.override]
    cfg = load_config(args.config, overrides)
    run_dir = args.run_dir or Path(cfg.train.out_dir) / f"tta-{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"

    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    device, bs, spe = trainer.device, cfg.optim.batch_size, trainer.feed.steps_per_epoch
    load_s = time.perf_counter() - t0
    print(f"{len(trainer.dataset)} images of {trainer.image_size}px loaded in {load_s:.1f} s; device "
          f"{device_name(device)}; {cfg.backbone.arch} width {cfg.backbone.width}, batch {bs}, {spe} steps per epoch, "
          f"compile {cfg.train.compile}; budget {args.minutes:g} min")

    # 1. the rate: one (compiling) step, then timed steps, all within the first epoch and counted as training
    sync(device)
    start = time.perf_counter()
    trainer.run_steps(1, within_epoch=True)
    sync(device)
    first_s = time.perf_counter() - start
    warm = min(args.warmup_steps or (30 if device.type == "cuda" else 3), max(spe - 1 - trainer.feed.pos, 0))
    t1, done = time.perf_counter(), 0
    while done < warm and time.perf_counter() - start < 0.25 * budget:   # a tiny budget: fewer estimate steps
        done += trainer.run_steps(1, within_epoch=True)
    sync(device)
    rate = done / (time.perf_counter() - t1) if done else 1.0 / first_s

    # 2. the compressed schedule
    left = budget - (time.perf_counter() - start)
    total = trainer.global_step + max(int(0.98 * left * rate), 0)   # 2%: end-of-epoch work, the last checkpoint
    paper_epochs = cfg.optim.epochs
    epochs = max(1, total // spe)
    lr_steps, warmup_epochs = compressed_schedule(cfg.optim, epochs)
    o, t = trainer.cfg.optim, trainer.cfg.train
    o.epochs, o.lr_steps, o.warmup_epochs = epochs, lr_steps, warmup_epochs
    m = trainer.cfg.method
    if hasattr(m, "prior_ramp_epochs"):                            # MiCE's prior warm-up shrinks with the rest
        scale = epochs / paper_epochs
        m.prior_uniform_epochs, m.prior_ramp_epochs = m.prior_uniform_epochs * scale, m.prior_ramp_epochs * scale
        trainer.method.prior_uniform_epochs, trainer.method.prior_ramp_epochs = m.prior_uniform_epochs, m.prior_ramp_epochs
    t.max_steps = max(min(total, epochs * spe), trainer.global_step + 1)
    t.checkpoint_every = epochs                                    # one checkpoint, at the end
    print(f"first step {first_s:.1f} s, then {rate:.2f} steps/s ({rate * bs:,.0f} samples/s): planned "
          f"{t.max_steps} steps = {t.max_steps / spe:.2f} epochs (the config's {paper_epochs}, lr x{o.lr_gamma} "
          f"at {lr_steps}, warm-up {warmup_epochs:.2f} epochs)")

    # 3. train to the plan, stopped at the end of the budget whatever happens
    def deadline() -> None:
        trainer.stop_requested = True
    timer = threading.Timer(max(budget - (time.perf_counter() - start), 0.0), deadline)
    timer.daemon = True
    timer.start()
    try:
        summary = trainer.fit()
    finally:
        timer.cancel()
    sync(device)
    train_s = time.perf_counter() - start
    status = {"finished": "schedule finished", "max_steps": "max_steps reached",
              "interrupted": "budget ran out"}.get(summary["status"], summary["status"])

    t2 = time.perf_counter()
    result = evaluate_model(trainer.method, trainer.dataset, trainer.cfg, device, run_dir, trainer.crop_size,
                            trainer.precision.autocast, trainer.precision.channels_last)
    eval_s = time.perf_counter() - t2
    print(format_results(result))
    primary = result["readouts"][result["primary"]]
    steps = trainer.global_step
    epochs_done = trainer.epoch + (trainer.feed.pos / spe if not trainer.feed.epoch_done else 0.0)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "config": args.config, "data": str(args.data), "num_images": len(trainer.dataset),
        "budget_s": budget, "train_s": train_s, "load_s": load_s, "eval_s": eval_s, "first_step_s": first_s,
        "compile": trainer.compile_info, "rate_steps_per_s": rate, "status": status,
        "steps": steps, "samples_seen": steps * bs, "epochs": epochs_done, "planned_epochs": epochs,
        "lr_steps": lr_steps, "batch_size": bs, "arch": cfg.backbone.arch, "width": cfg.backbone.width,
        "primary": result["primary"],
        "acc": primary.get("acc"), "nmi": primary.get("nmi"), "ari": primary.get("ari"),
        "readouts": result["readouts"], "run_dir": str(run_dir),
    }
    print(f"\ntime to accuracy: {train_s:.1f} s of training ({status}), {steps} steps, {steps * bs:,} samples "
          f"seen, {epochs_done:.2f} epochs -> {result['primary']}: ACC {_pct(report['acc'])} NMI "
          f"{_pct(report['nmi'])} ARI {_pct(report['ari'])} (load {load_s:.1f} s and evaluation {eval_s:.1f} s "
          f"not counted)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"written to {args.json}")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
