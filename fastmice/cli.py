"""The `fastmice` command: train, eval, data."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

DEFAULT_CONFIG = "digits"
PROFILE_WARMUP = 3    # steps run before profiling (the first one compiles under train.compile)

TRAIN_HELP = """\
Train a clustering model. CONFIG is a YAML file or the name of a bundled config
(digits, cifar10, cifar100_20, stl10, imagenet_dog, and mixem_*, simclr_*, moco_* for cifar10,
cifar100_20 and stl10); without one, the embedded default trains MiCE on scikit-learn's bundled digits
(no download, 1.5-2.5 minutes on 2 CPU cores). The config's `method:` picks mice, mixem, simclr or moco.

Any setting can be overridden as --section.key=value, e.g.
  fastmice train cifar10 --data.root=~/data/cifar10-jpeg --optim.epochs=200 --train.run_name=c10
Sections: data, augment, backbone, method, optim, train, eval (fastmice/config.py; method keys: fastmice/methods/).

The papers' protocols (README, "Reproducing the papers"):
  fastmice train cifar10 --seeds 0-4 --run-dir runs/t1      Table 1: 5 seeds, mean ± std beside the paper
  fastmice train cifar10 --method.prior=uniform              a Table 3 ablation (A3); see the README's table
  fastmice train mice_finetune_cifar10 --init-from RUN --augment-recipe randaugment     Table 4

Speed: --train.compile=reduce-overhead (torch.compile of the whole forward), --method.single_pass=true,
--optim.impl=fused; `fastmice train cifar10 ... --profile` writes a torch.profiler trace of 10 steps.

Dashboards beside metrics.jsonl: --train.loggers=tensorboard (RUN/tensorboard; watch with
`tensorboard --logdir runs/`), --train.loggers=wandb (Weights & Biases; --train.wandb_project, _entity,
_group, _tags, _mode=offline|disabled, or WANDB_PROJECT, WANDB_MODE, ...; offline runs upload with
`wandb sync RUN/wandb/offline-run-*`), or both: --train.loggers=tensorboard,wandb. Loss, lr and samples/s
every log step, cluster sizes and posterior histograms every epoch, probe and final ACC/NMI/ARI, the
confusion and cluster-size pictures, the config as hyperparameters; --resume continues the same curves.
Needs pip install "fastmice[tensorboard]" / "fastmice[wandb]".

Data too big for memory: --data.loader=dali reads the files through NVIDIA DALI every epoch (nvJPEG on the
GPU); the default, auto, does so for a folder whose decoded images exceed --data.memory_limit_gb (16).
"""


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    overrides = []
    for item in extra:
        if item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]:
            overrides.append(item)
        else:
            parser.error(f"unrecognised argument {item!r} (settings are given as --section.key=value)")
    return overrides


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmice.config import load_config, parse_overrides
    from fastmice.engine.run_folder import check_new_run
    from fastmice.engine.trainer import Trainer, default_run_dir

    if args.init_from and not args.resume:
        overrides = overrides + [f"--train.init_from={args.init_from}"]
    if args.augment_recipe:
        from fastmice.views.augment import recipe_overrides
        overrides = recipe_overrides(args.augment_recipe) + overrides   # explicit --augment.* still win
    if args.seeds:
        if args.profile is not None:
            raise ValueError("--profile profiles one run; drop --seeds")
        return _train_seeds(args, overrides)
    if args.resume:
        if args.config:
            print("note: --resume uses the config saved in the run folder; CONFIG is ignored", file=sys.stderr)
        with run_lock(args.resume):
            trainer = _quiet_skips(lambda: Trainer.resume(args.resume, parse_overrides(overrides)))
            if trainer.finished and (trainer.run_dir / "eval.json").is_file():
                print(f"{trainer.run_dir} has finished training (epoch {trainer.epoch} of "
                      f"{trainer.cfg.optim.epochs}, step {trainer.global_step}) and is evaluated: nothing to resume. "
                      f"`fastmice eval {trainer.run_dir}` evaluates it again; --optim.epochs=N (N > {trainer.epoch}) "
                      f"or a larger --train.max_steps trains on.")
                return 0
            if trainer.finished:
                print(f"{trainer.run_dir} has finished training (epoch {trainer.epoch}, step "
                      f"{trainer.global_step}) but has no eval.json: evaluating it")
                return _closing(trainer, lambda: _evaluate(trainer))
            print(f"resuming {trainer.run_dir} at epoch {trainer.epoch}, step {trainer.global_step}")
            return _closing(trainer, lambda: _train_and_evaluate(trainer, args))
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    with run_lock(run_dir):
        if is_rank0():
            check_new_run(run_dir)
        trainer = _quiet_skips(lambda: Trainer(cfg, run_dir))
        print(f"run folder: {trainer.run_dir}")
        return _closing(trainer, lambda: _train_and_evaluate(trainer, args))


def _closing(trainer, body) -> int:
    """body() (training and evaluation), then the run's dashboards closed with its exit status (W&B: the run
    is marked finished, or failed with the exception's status)."""
    try:
        code = body()
    except BaseException:
        trainer.close(exit_code=1)
        raise
    trainer.close(exit_code=code)
    return code


def is_rank0() -> bool:
    """Rank 0 of a torchrun job (before the process group exists), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def run_lock(run_dir: str | Path):
    """The run folder's writer lock (rank 0 only: the other ranks of a torchrun job write nothing)."""
    from fastmice.engine.run_folder import RunFolderLock
    return RunFolderLock(run_dir) if is_rank0() else contextlib.nullcontext()


def _quiet_skips(build):
    """Build the trainer without the data readers' warning about unreadable files: the train command lists them
    all in the run folder instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipped .* unreadable image")
        return build()


def _train_and_evaluate(trainer, args: argparse.Namespace) -> int:
    ds = trainer.dataset
    skipped_note = ""
    if ds.skipped and is_rank0():
        listed = trainer.run_dir / "skipped_files.txt"
        listed.parent.mkdir(parents=True, exist_ok=True)
        listed.write_text("".join(f"{path}\t{reason}\n" for path, reason in ds.skipped))
        skipped_note = f", {len(ds.skipped)} unreadable skipped (listed in {listed})"
    print(f"data: {ds.name}, {len(ds)} images of {trainer.image_size}px{skipped_note}"
          + f"; device {trainer.device}; {trainer.feed.steps_per_epoch} steps per epoch; "
          + ("read by DALI every epoch (data.loader=dali)" if trainer.loader == "dali" else
             "held in memory (data.loader=memory)"))
    if args.profile is not None:
        if args.profile < 1:
            raise ValueError(f"--profile N needs N >= 1 steps, got {args.profile}")
        folder = trainer.profile(steps=args.profile, warmup=PROFILE_WARMUP)
        print(f"profiled {args.profile} steps after {PROFILE_WARMUP} warm-up steps"
              + (f" (the first compiled in {trainer.compile_info['seconds']:.1f} s)"
                 if trainer.compile_info and trainer.compile_info.get("seconds") else "")
              + f": {folder / 'trace.json'} (open in https://ui.perfetto.dev or chrome://tracing), "
              f"{folder / 'top_ops.txt'}; no checkpoint written")
        return 0
    summary = trainer.fit()
    print(f"training {summary['status']}: epoch {summary['epoch']}, step {summary['global_step']}, "
          f"loss {summary['loss']:.4f}")
    if summary["status"] == "interrupted":
        return 130
    return _evaluate(trainer) if trainer.cfg.eval.at_end else 0


def _evaluate(trainer) -> int:
    from fastmice.eval.evaluate import evaluate_model, format_results

    ds = trainer.dataset
    result = evaluate_model(trainer.method, ds, trainer.cfg, trainer.device, trainer.run_dir,
                            trainer.crop_size, trainer.precision.autocast, trainer.precision.channels_last)
    trainer.log.final(result, trainer.cfg.to_dict(), trainer.global_step)   # to the dashboards (train.loggers)
    print(format_results(result))
    print(f"written to {trainer.run_dir}: eval.json, assignments.csv, cluster_sizes.png"
          + (", confusion.png" if ds.labels is not None else ""))
    print(f"pictures and the HTML report: fastmice report {trainer.run_dir}")
    return 0


def _train_seeds(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmice.config import load_config
    from fastmice.engine.loggers import require
    from fastmice.report.seeds import default_group_dir, format_summary, parse_seeds, run_seeds

    if args.resume:
        raise ValueError("--seeds and --resume: to continue a group of seeds, run the same --seeds command "
                         "with --run-dir GROUP (finished seeds are skipped, interrupted ones resume)")
    seeds = parse_seeds(args.seeds)
    cfg = load_config(args.config or DEFAULT_CONFIG, overrides)   # fail here, not once per seed
    require(cfg.train.loggers)                                    # a dashboard's package: once, here too
    group = Path(args.run_dir) if args.run_dir else default_group_dir(args.config, cfg.train.out_dir)
    print(f"{len(seeds)} seeds into {group}")
    summary = run_seeds(args.config, overrides, seeds, group, parallel=args.parallel)
    print(format_summary(summary))
    print(f"written to {group}: summary.json, summary.md")
    return 1 if summary.get("failed_seeds") else 0


def cmd_summary(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmice.report.seeds import find_runs, format_summary, summarize

    runs = find_runs([Path(p) for p in args.runs])
    out = Path(args.out) if args.out else (Path(args.runs[0]) if len(args.runs) == 1 else None)
    summary = summarize(runs, out)
    print(format_summary(summary))
    if out is not None:
        print(f"written to {out}: summary.json, summary.md")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from fastmice.config import parse_overrides
    from fastmice.eval.evaluate import evaluate_run, format_results

    result = evaluate_run(args.run, device=args.device, overrides=parse_overrides(overrides))
    print(format_results(result))
    print(f"written to {Path(args.run)}: eval.json, assignments.csv, cluster_sizes.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmice", description="Deep clustering with mixtures of "
                                     "contrastive embeddings (MiCE, ICLR 2021).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: MiCE on the bundled digits)", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML file or bundled config name (default: digits)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its checkpoint")
    p.add_argument("--run-dir", metavar="DIR", help="run folder (default: train.out_dir/<name>-<date>)")
    p.add_argument("--init-from", metavar="CKPT", help="start the backbone from another run's checkpoint "
                   "(a run folder or checkpoint.pt; e.g. SimCLR before MIX'EM); same as --train.init_from")
    p.add_argument("--seeds", metavar="LIST", help="the Table 1 protocol: one run per seed (e.g. 0,1,2,3,4 or 0-4) "
                   "into RUN_DIR/seed<S>, then mean ± std of ACC/NMI/ARI beside the paper's figures "
                   "(RUN_DIR/summary.md); run it again to continue after an interruption")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="with --seeds: train N seeds at once (on one GPU when memory allows; default 1)")
    p.add_argument("--augment-recipe", metavar="NAME", choices=("moco", "simclr", "randaugment"),
                   help="the augmentation recipe: moco (MoCo v1, MiCE's), simclr, or randaugment (crop, flip, "
                   "RandAugment N=2 M=9); the Table 4 switch. --augment.* overrides still apply on top")
    p.add_argument("--profile", nargs="?", type=int, const=10, default=None, metavar="N",
                   help=f"profile instead of training: {PROFILE_WARMUP} warm-up steps, then N steps (default 10) under "
                   "torch.profiler; writes RUN/profile/trace.json and RUN/profile/top_ops.txt and stops (no "
                   "checkpoint, no evaluation). Put CONFIG before it: `fastmice train cifar10 --profile 5`")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint: ACC/NMI/ARI, assignments, pictures",
                       description="Evaluate RUN/checkpoint.pt on its dataset without augmentation. Writes "
                       "eval.json, assignments.csv, cluster_sizes.png and confusion.png (with labels) into RUN. "
                       "Overrides such as --data.root=PATH point it at moved data.")
    p.add_argument("run", metavar="RUN", help="run folder holding checkpoint.pt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("summary", help="mean ± std of ACC/NMI/ARI over runs (e.g. the seeds of --seeds)",
                       description="Summarise evaluated runs (folders holding eval.json, or a folder of them, such "
                       "as the RUN_DIR of `fastmice train --seeds`): mean ± sample std of every readout's "
                       "ACC/NMI/ARI in %, the published figures beside them, and the training time.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders of run folders")
    p.add_argument("--out", metavar="DIR", help="write summary.json and summary.md here (default: the folder "
                   "given, when only one is given)")
    p.set_defaults(func=cmd_summary)

    from fastmice.data.prepare import add_data_arguments
    from fastmice.eval.predict import add_predict_arguments
    from fastmice.report.html_report import add_report_arguments
    add_predict_arguments(sub)
    add_report_arguments(sub)
    add_data_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "data":
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        from fastmice.data.prepare import run_data_command
        return run_data_command(args)
    overrides = _split_overrides(extra, parser)
    from fastmice.config import ConfigError
    from fastmice.core.checkpoint import CheckpointError
    from fastmice.data.sources import DataError
    from fastmice.engine.run_folder import RunFolderBusy
    from fastmice.engine.run_log import NonFiniteLossError
    try:
        if args.command in ("eval", "report"):   # they write into the run folder too
            with run_lock(args.run):
                return args.func(args, overrides)
        return args.func(args, overrides)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, RunFolderBusy) as e:
        print(f"fastmice: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"fastmice: error: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # bad input found while building the run (queue larger than the data, ...)
        print(f"fastmice: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
