"""Dashboards beside metrics.jsonl: TensorBoard and Weights & Biases (`train.loggers`).

metrics.jsonl stays the run's record (the report, `fastmice summary` and resume read it) and is always written.
RunLog hands every record it appends there to each dashboard logger named in `train.loggers`, so the
dashboards hold the same values at the same steps as the file:

  record type   tags (x axis: the global step)
  step          train/loss, train/lr, train/samples_per_s               every train.log_every steps
  epoch         epoch/loss, epoch/lr, epoch/samples_per_s, epoch/epoch_seconds, epoch/epoch, and the
                method's per-epoch values: epoch/cluster_sizes (MiCE: a histogram over the cluster index,
                bucket k holding cluster k's size) and epoch/posterior_hist (the 10-bin histogram of the
                posterior values over [0, 1], the paper's Fig. 3) as histograms, numbers as scalars
  eval          probe/<readout>/acc|nmi|ari, probe/linear_probe/accuracy   (eval.probe_every)
  compile       compile/seconds, compile/graph_breaks                   (train.compile, the first step)
  (the end)     final/<readout>/acc|nmi|ari, final/acc|nmi|ari (the primary readout's), final/pixel_kmeans/*,
                final/confidence/*, and the images final/confusion and final/cluster_sizes
  (the start)   the full config as hyperparameters (TensorBoard's HParams tab and a `config` text; W&B's config)

Nothing here reads the device: the records hold host numbers only, made at the trainer's existing log points.
Each package is imported only when its logger is asked for. Rank 0 alone logs (RunLog is disabled elsewhere).

A resumed run continues the same curves. TensorBoard writes RUN/tensorboard/ again with purge_step = the
checkpoint's step + 1, so events a killed process wrote past the checkpoint are hidden, as metrics.jsonl drops
them. W&B: the run id is kept in RUN/wandb/fastmice-run-id and the run resumed with it (resume="allow"); every
value is plotted against `global_step` (define_metric), W&B's own `_step` restarting in an offline session.
W&B has no purge: after a kill -9, the points a killed process logged past its checkpoint stay, and the resumed
run logs those steps again (two points at one global_step); metrics.jsonl and TensorBoard hold them once.
Offline runs (WANDB_MODE=offline) land in RUN/wandb/offline-run-*/, one folder per session, uploaded with
`wandb sync RUN/wandb/offline-run-*`.
"""
from __future__ import annotations

import importlib
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fastmice.core.errors import ConfigError

# logger -> (the module it needs, the extra that installs it)
PACKAGES = {"tensorboard": ("torch.utils.tensorboard", 'pip install "fastmice[tensorboard]"'),
            "wandb": ("wandb", 'pip install "fastmice[wandb]"')}
TB_DIR = "tensorboard"
WANDB_ID_FILE = Path("wandb") / "fastmice-run-id"
WANDB_MAX_BINS = 512            # wandb.Histogram's limit
PREFIX = {"step": "train", "epoch": "epoch", "eval": "probe", "compile": "compile"}
IMAGES = {"confusion": "confusion.png", "cluster_sizes": "cluster_sizes.png"}


class Logger(Protocol):
    """One dashboard. Every method takes host values only and may buffer; close() flushes."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def histogram(self, step: int, name: str, counts: np.ndarray, edges: np.ndarray) -> None: ...
    def image(self, step: int, name: str, path: Path) -> None: ...
    def hparams(self, config: dict[str, Any]) -> None: ...
    def summary(self, values: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self, exit_code: int = 0) -> None: ...


def dashboard_names(loggers: list[str]) -> list[str]:
    """The loggers of `train.loggers` beyond metrics.jsonl, in order, each once."""
    return [n for n in dict.fromkeys(loggers) if n != "jsonl"]


def require(loggers: list[str]) -> None:
    """Import the package of every logger asked for; a missing one is a ConfigError naming the extra."""
    for name in dashboard_names(loggers):
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"train.loggers includes {name}, but {module} cannot be imported ({e}): "
                              f"{extra}, or drop {name} from train.loggers") from e


# ---- records to values ------------------------------------------------------------------------------------
def flatten(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"prefix/a/b": 1}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def histogram_edges(key: str, n: int) -> np.ndarray:
    """Bucket edges (n + 1) of a pre-binned list: the posterior's bins over [0, 1], else one bucket per index."""
    if key.endswith("posterior_hist"):
        return np.linspace(0.0, 1.0, n + 1)
    return np.arange(n + 1, dtype=np.float64)


def coarsen(counts: np.ndarray, edges: np.ndarray, max_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most max_bins buckets: runs of ceil(n / max_bins) neighbouring buckets summed (the last run may be
    shorter); edges (n + 1) kept at the runs' bounds."""
    if len(counts) <= max_bins:
        return counts, edges
    group = -(-len(counts) // max_bins)
    pad = (-len(counts)) % group
    return np.pad(counts, (0, pad)).reshape(-1, group).sum(1), np.append(edges[:-1:group], edges[-1])


def split_record(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A metrics.jsonl record -> (scalars by tag, pre-binned histogram counts by tag); strings and nulls are
    left out. `type` and `step` make the tag's prefix and the x value; `epoch` is a scalar of epoch records only."""
    kind = record.get("type", "step")
    skip = {"type", "step"} | ({"epoch"} if kind != "epoch" else set())
    flat = flatten({k: v for k, v in record.items() if k not in skip}, PREFIX.get(kind, kind))
    scalars, hists = {}, {}
    for tag, v in flat.items():
        if isinstance(v, bool):
            scalars[tag] = float(v)
        elif isinstance(v, (int, float)):
            scalars[tag] = float(v)
        elif isinstance(v, list) and v and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v):
            hists[tag] = np.asarray(v, dtype=np.float64)
    return scalars, hists


def final_values(result: dict[str, Any]) -> dict[str, float]:
    """The scalars of an evaluation (eval.json's dict) under final/: every readout's scores, the primary's
    also as final/acc|nmi|ari (the HParams tab's metrics), the pixel baseline, confidence, the linear probe."""
    picked = {"readouts": {n: {m: v for m, v in e.items() if m != "cluster_sizes"}
                           for n, e in result.get("readouts", {}).items()}}
    for key in ("pixel_kmeans", "confidence", "linear_probe"):
        if key in result:
            picked[key] = result[key]
    values = {t.replace("final/readouts/", "final/"): v for t, v in flatten(picked, "final").items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    primary = result.get("readouts", {}).get(result.get("primary"), {})
    values.update({f"final/{m}": float(primary[m]) for m in ("acc", "nmi", "ari") if m in primary})
    return {k: float(v) for k, v in values.items()}


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """{"optim": {"lr": 1.0}} -> {"optim.lr": 1.0}; lists and nulls as text (TensorBoard's HParams types)."""
    out = {}
    for tag, v in flatten(config, "").items():
        out[tag[1:].replace("/", ".")] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


# ---- the loggers ------------------------------------------------------------------------------------------
class TensorBoardLogger:
    """torch.utils.tensorboard's SummaryWriter into RUN/tensorboard (a resumed run: the same folder)."""

    def __init__(self, run_dir: Path, global_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / TB_DIR
        self.fresh = not any(self.log_dir.glob("events.out.tfevents.*"))
        # purge_step: TensorBoard hides the events of earlier files at steps >= it (past the checkpoint).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if self.fresh else global_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def histogram(self, step: int, name: str, counts: np.ndarray, edges: np.ndarray) -> None:
        total = float(counts.sum())
        if total <= 0:
            return
        centers = (edges[:-1] + edges[1:]) / 2
        used = np.flatnonzero(counts)
        self.writer.add_histogram_raw(name, min=float(edges[used[0]]), max=float(edges[used[-1] + 1]), num=total,
                                      sum=float((counts * centers).sum()),
                                      sum_squares=float((counts * centers ** 2).sum()),
                                      bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
                                      global_step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(name, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def hparams(self, config: dict[str, Any]) -> None:
        """The config in the HParams tab (once, in a fresh folder) and as a `config` text."""
        if not self.fresh:
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own event file (SummaryWriter.add_hparams would open a sub-run per call);
        # the metrics named are the final/ scalars logged at the end.
        writer = self.writer.file_writer   # (made by SummaryWriter's constructor)
        for summary in hparams(flat_config(config), {f"final/{m}": 0.0 for m in ("acc", "nmi", "ari")}):
            writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def summary(self, values: dict[str, float]) -> None:
        pass   # TensorBoard has no run summary: the final/ scalars are its record

    def flush(self) -> None:
        self.writer.flush()

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run whose id is kept in the run folder; settings from train.wandb_* or the environment."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        run_dir = Path(run_dir)
        train = config.get("train", {})
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        tags = list(train.get("wandb_tags") or []) + [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
        seed_folder = re.fullmatch(r"seed\d+", run_dir.name) is not None   # a --seeds sweep: GROUP/seed<S>
        group = train.get("wandb_group") or os.environ.get("WANDB_RUN_GROUP") or (
            run_dir.parent.name if seed_folder else None)
        kwargs = {"mode": train.get("wandb_mode")} if train.get("wandb_mode") else {}
        try:
            self.run = wandb.init(
                project=train.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "fastmice",
                entity=train.get("wandb_entity") or os.environ.get("WANDB_ENTITY") or None,
                name=f"{run_dir.parent.name}/{run_dir.name}" if seed_folder else run_dir.name,
                group=group, tags=list(dict.fromkeys(tags)) or None, config=config, dir=str(run_dir),
                id=run_id, resume="allow", reinit="create_new", **kwargs)
        except Exception as e:  # noqa: BLE001 - login, network: one line before training, not a traceback
            raise ConfigError(f"train.loggers includes wandb, but wandb.init failed: {e}. Log in with `wandb login`, "
                              f"or log offline with WANDB_MODE=offline (or --train.wandb_mode=offline) and upload "
                              f"later with `wandb sync {run_dir}/wandb/offline-run-*`") from e
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"global_step": step, **values})

    def histogram(self, step: int, name: str, counts: np.ndarray, edges: np.ndarray) -> None:
        counts, edges = coarsen(counts, edges, WANDB_MAX_BINS)   # e.g. K > 512 clusters
        self.run.log({"global_step": step, name: self.wandb.Histogram(np_histogram=(counts.tolist(),
                                                                                   edges.tolist()))})

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({"global_step": step, name: self.wandb.Image(str(path))})

    def hparams(self, config: dict[str, Any]) -> None:
        pass   # given to wandb.init as the run's config

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def flush(self) -> None:
        pass   # wandb sends as it goes

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


# ---- the fan-out ------------------------------------------------------------------------------------------
class Dashboards:
    """The dashboard loggers of one run; each call goes to every one of them."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    @classmethod
    def open(cls, names: list[str], run_dir: Path, config: dict[str, Any], global_step: int) -> "Dashboards":
        """Open the loggers named (beyond jsonl) for a run starting or resuming at `global_step`, and log the
        config as hyperparameters."""
        require(names)
        opened: list[Logger] = []
        for name in dashboard_names(names):
            opened.append(TensorBoardLogger(run_dir, global_step) if name == "tensorboard"
                          else WandbLogger(run_dir, config))
        out = cls(opened)
        for lg in out.loggers:
            lg.hparams(config)
        return out

    def write(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""
        if not self.loggers:
            return
        step = int(record.get("step", 0))
        scalars, hists = split_record(record)
        for lg in self.loggers:
            if scalars:
                lg.scalars(step, scalars)
            for tag, counts in hists.items():
                lg.histogram(step, tag, counts, histogram_edges(tag, len(counts)))

    def final(self, result: dict[str, Any], run_dir: Path, step: int) -> None:
        """The evaluation at the end: its scores as scalars and summary, the PNGs it wrote as images."""
        values = final_values(result)
        for lg in self.loggers:
            lg.scalars(step, values)
            lg.summary(values)
            for name, file in IMAGES.items():
                if (Path(run_dir) / file).is_file():
                    lg.image(step, f"final/{name}", Path(run_dir) / file)

    def flush(self) -> None:
        for lg in self.loggers:
            lg.flush()

    def close(self, exit_code: int = 0) -> None:
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            lg.close(exit_code)
