"""The Table 1 protocol: one config trained with several seeds, summarised as mean +- std beside the paper.

`fastmice train CONFIG --seeds 0,1,2,3,4` trains RUN_GROUP/seed0 ... seed4 (one after another, or several at
once with --parallel N when the GPU has room), each a normal run folder, then writes RUN_GROUP/summary.json
and summary.md. Each run is its own `fastmice train` process, so a crash or Ctrl-C loses nothing: running the
same command again skips the seeds that finished (eval.json written) and resumes the others from their
checkpoints. `fastmice summary RUN_GROUP` (or a list of run folders) rebuilds the summary from the folders.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# Published figures (ACC/NMI/ARI in %; None where a paper gives none), looked up by the config's name.
# MiCE: Table 1 (mean of 5 runs); MoCo + spherical k-means: MiCE's Table 1 baseline (its CIFAR-10 ARI is
# illegible in our copy); MIX'EM: the ACC its README reports.
PAPER: dict[str, dict[str, Any]] = {
    "cifar10": {"acc": 83.4, "nmi": 73.5, "ari": 69.5, "source": "MiCE, Table 1", "hours": 30.0},
    "cifar100_20": {"acc": 42.2, "nmi": 43.0, "ari": 27.7, "source": "MiCE, Table 1"},
    "stl10": {"acc": 72.0, "nmi": 61.3, "ari": 53.2, "source": "MiCE, Table 1"},
    "imagenet_dog": {"acc": 39.0, "nmi": 39.4, "ari": 24.7, "source": "MiCE, Table 1"},
    "moco_cifar10": {"acc": 74.7, "nmi": 66.0, "ari": None, "source": "MiCE, Table 1 (MoCo)", "hours": 17.0},
    "moco_cifar100_20": {"acc": 39.5, "nmi": 38.8, "ari": 24.0, "source": "MiCE, Table 1 (MoCo)"},
    "mixem_cifar10": {"acc": 82.0, "nmi": None, "ari": None, "source": "MIX'EM README"},
    "mixem_cifar100_20": {"acc": 44.0, "nmi": None, "ari": None, "source": "MIX'EM README"},
    "mixem_stl10": {"acc": 78.0, "nmi": None, "ari": None, "source": "MIX'EM README"},
}
PAPER_TIME = "MiCE 30 h, MoCo 17 h: 1000 CIFAR-10 epochs on one GTX 1080 Ti (MiCE, Appendix E)"
METRICS = ("acc", "nmi", "ari")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' (or a mix, '0-2,7') -> [0, 1, 2, ...]; duplicates refused."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                seeds += list(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected integers such as 0,1,2,3,4 or 0-4") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def _train_command(config: str | None, overrides: list[str], seed: int, run_dir: Path) -> list[str]:
    if (run_dir / "checkpoint.pt").is_file():   # interrupted earlier: continue where it stopped
        return [sys.executable, "-m", "fastmice", "train", "--resume", str(run_dir)]
    cmd = [sys.executable, "-m", "fastmice", "train"] + ([config] if config else [])
    return cmd + ["--run-dir", str(run_dir), f"--train.seed={seed}", "--eval.at_end=true"] + overrides


def run_seeds(config: str | None, overrides: list[str], seeds: list[int], group_dir: Path,
              parallel: int = 1) -> dict[str, Any]:
    """Train CONFIG once per seed into group_dir/seed<S> (at most `parallel` processes at a time) and
    summarise. Seeds whose folder already holds eval.json are not trained again."""
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    group_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in seeds if not (group_dir / f"seed{s}" / "eval.json").is_file()]
    if len(todo) < len(seeds):
        print(f"{len(seeds) - len(todo)} seed(s) already evaluated in {group_dir}: not trained again")
    running: list[tuple[int, subprocess.Popen]] = []
    failed: list[int] = []

    def finish(seed: int, proc: subprocess.Popen) -> None:
        running.remove((seed, proc))
        if proc.wait() != 0:
            failed.append(seed)
            where = f"; its output: {group_dir / f'seed{seed}' / 'train.log'}" if parallel > 1 else ""
            print(f"seed {seed}: failed with exit code {proc.returncode}{where}")
        else:
            print(f"seed {seed}: done")

    try:
        for seed in todo:
            while len(running) >= parallel:   # wait for a free slot
                for seed_, proc in list(running):
                    if proc.poll() is not None:
                        finish(seed_, proc)
                if len(running) >= parallel:
                    time.sleep(0.2)
            run_dir = group_dir / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = _train_command(config, overrides, seed, run_dir)
            print(f"seed {seed}: fastmice {' '.join(cmd[3:])}")
            if parallel == 1:   # one at a time: the run's own progress bar and output on this console
                proc = subprocess.Popen(cmd)
            else:               # several at once: each writes its output to its folder
                with open(run_dir / "train.log", "a") as log:
                    proc = subprocess.Popen(cmd + ["--train.progress=false"], stdout=log, stderr=subprocess.STDOUT)
            running.append((seed, proc))
        while running:
            finish(*running[0])
    except KeyboardInterrupt:   # the children got the same Ctrl-C: they checkpoint and exit
        for _, proc in running:
            proc.wait()
        print(f"interrupted: run the same command again to continue ({group_dir})")
        raise
    return summarize([group_dir / f"seed{s}" for s in seeds], group_dir,
                     extra={"failed_seeds": failed} if failed else None)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)   # sample std


def _train_seconds(run_dir: Path) -> float:
    """Training wall-clock of a run: the sum of its epochs' seconds in metrics.jsonl (resumes included)."""
    from fastmice.report.html_report import read_epochs
    return float(sum(r.get("epoch_seconds", 0.0) for r in read_epochs(run_dir / "metrics.jsonl")))


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding eval.json) among `paths`, each a run folder or a folder of them."""
    runs: list[Path] = []
    for p in paths:
        if (p / "eval.json").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(q.parent for q in p.glob("*/eval.json"))
    return runs


def summarize(run_dirs: list[Path], out_dir: Path | None = None, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Mean and sample std over the runs of every readout's ACC/NMI/ARI (in %), the paper's figures beside
    them, and the training time; written to out_dir/summary.json and summary.md when out_dir is given."""
    runs = [d for d in run_dirs if (d / "eval.json").is_file()]
    if not runs:
        raise FileNotFoundError(f"no evaluated run (eval.json) among {[str(d) for d in run_dirs]}")
    evals = [json.loads((d / "eval.json").read_text()) for d in runs]
    configs = [_run_config(d) for d in runs]
    names = {c.get("name") for c in configs}
    name = names.pop() if len(names) == 1 else "mixed"
    readouts: dict[str, dict[str, Any]] = {}
    for readout in evals[0]["readouts"]:
        per_run = [e["readouts"].get(readout, {}) for e in evals]
        if not all(m in r for r in per_run for m in METRICS):
            continue   # unlabelled data: no ACC/NMI/ARI
        readouts[readout] = {m: dict(zip(("mean", "std"), _mean_std([100 * r[m] for r in per_run])))
                             for m in METRICS}
        readouts[readout]["per_run"] = [{m: 100 * r[m] for m in METRICS} for r in per_run]
    seconds = [_train_seconds(d) for d in runs]
    summary = {"name": name, "method": configs[0].get("method"), "runs": [str(d) for d in runs],
               "seeds": [c.get("train", {}).get("seed") for c in configs],
               "primary": evals[0].get("primary"), "readouts": readouts,
               "train_seconds": {"per_run": seconds, "mean": sum(seconds) / len(seconds), "total": sum(seconds)},
               "epochs": [c.get("optim", {}).get("epochs") for c in configs],
               "paper": PAPER.get(name), "paper_time": PAPER_TIME,
               "written": datetime.now().isoformat(timespec="seconds"), **(extra or {})}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "summary.md").write_text(format_summary(summary) + "\n")
    return summary


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _cell(stat: dict[str, float] | None) -> str:
    return "-" if stat is None else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def format_summary(s: dict[str, Any]) -> str:
    """The paper's table format: ACC / NMI / ARI (%), mean ± std over the seeds, the published row below."""
    n = len(s["runs"])
    lines = [f"## {s['name']} ({s['method']}): {n} run(s), seeds {', '.join(str(x) for x in s['seeds'])}", "",
             "| readout | ACC | NMI | ARI |", "|---|---|---|---|"]
    for readout, stats in s["readouts"].items():
        mark = " (primary)" if readout == s.get("primary") else ""
        lines.append(f"| {readout}{mark} | " + " | ".join(_cell(stats[m]) for m in METRICS) + " |")
    paper = s.get("paper")
    if paper:
        lines.append(f"| published ({paper['source']}) | "
                     + " | ".join("-" if paper[m] is None else f"{paper[m]:.1f}" for m in METRICS) + " |")
    if not s["readouts"]:
        lines.append("| (no labels: nothing to score) | - | - | - |")
    t = s["train_seconds"]
    lines += ["", f"Training time: {t['mean'] / 3600:.2f} h per run on average ({t['total'] / 3600:.2f} h in all; "
              f"epochs {sorted({e for e in s['epochs'] if e is not None})}). Published: {s['paper_time']}."]
    return "\n".join(lines)


def default_group_dir(config: str | None, out_dir: str = "runs") -> Path:
    stem = Path(config).stem if config else "digits"
    return Path(out_dir) / f"{stem}-seeds-{datetime.now():%Y%m%d-%H%M%S}"
