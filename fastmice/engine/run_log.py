"""A run folder as the trainer writes it: config.yaml, metrics.jsonl (one JSON record per line) and the
checkpoint, and the dashboards of `train.loggers` (fastmice.engine.loggers), which get every record written to
metrics.jsonl at its step. Rank 0 alone writes; on other ranks every method does nothing.

A resumed run's log reads like the uninterrupted one's: records past the checkpoint's step (written after the
last checkpoint by a process that was then killed) are dropped when the run starts again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from fastmice.core.checkpoint import atomic_save, atomic_write_text, nonfinite_message, nonfinite_tensors
from fastmice.engine.compile import graph_breaks
from fastmice.engine.loggers import Dashboards

METRICS_NAME = "metrics.jsonl"


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as a dict; None for a blank line or the torn last line of a killed writer."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf."""


class NonFiniteStateError(NonFiniteLossError):
    """The state about to be checkpointed holds NaN or inf; the checkpoint on disk is left as it was."""


def compile_record(mode: str, seconds: float, step: int) -> dict[str, Any]:
    """The metrics record of train.compile's first step."""
    from fastmice.core import distributed
    if distributed.active():
        return {"type": "compile", "mode": mode, "seconds": None, "step": step,
                "skipped": "train.compile is not applied under torchrun: the teacher's all_gathers and shuffle-BN "
                           "split the graph and DDP needs its own bucketing; the step runs eagerly"}
    return {"type": "compile", "mode": mode, "seconds": seconds, "graph_breaks": graph_breaks(), "step": step,
            "note": "wall time of the first step: compiling the forward and backward, plus one step"}


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.checkpoint_written = (self.run_dir / "checkpoint.pt").is_file()
        self.dashboards: Dashboards | None = None    # opened by start() (or final()), closed by close()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_NAME

    def start(self, config: dict[str, Any], global_step: int) -> None:
        """Create the folder, write config.yaml, and drop records past `global_step` (the resumed state)."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(config, sort_keys=False), self.run_dir / "config.yaml")
        if self.metrics_path.is_file():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if (record := _parse(line)) is not None and record.get("step", 0) <= global_step]
            atomic_write_text("".join(line + "\n" for line in kept), self.metrics_path)
        self.open_dashboards(config, global_step)

    def open_dashboards(self, config: dict[str, Any], global_step: int) -> None:
        """Open the loggers of config's train.loggers (once; a resumed run continues their curves at
        `global_step`) and log the config as hyperparameters."""
        if self.enabled and self.dashboards is None:
            self.dashboards = Dashboards.open(config["train"].get("loggers", ["jsonl"]), self.run_dir, config,
                                              global_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl (once the run folder exists: speed probes write none), and hand
        it to the dashboards."""
        if not self.enabled or not self.run_dir.is_dir():
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.dashboards is not None:
            self.dashboards.write(record)

    def final(self, result: dict[str, Any], config: dict[str, Any], global_step: int) -> None:
        """The evaluation at the end of training (eval.json's dict, the PNGs beside it) to the dashboards."""
        if not self.enabled:
            return
        self.open_dashboards(config, global_step)
        self.dashboards.final(result, self.run_dir, global_step)

    def flush(self) -> None:
        if self.dashboards is not None:
            self.dashboards.flush()

    def close(self, exit_code: int = 0) -> None:
        """Close the dashboards (W&B: finish the run with `exit_code`); they reopen on the next start()."""
        if self.dashboards is not None:
            dashboards, self.dashboards = self.dashboards, None
            dashboards.close(exit_code)

    def save_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Write `state` atomically, unless it holds NaN or inf: then raise, keeping the last good checkpoint."""
        bad = nonfinite_tensors({"model": state["model"], "optimizer": state["optimizer"]})
        if bad:
            raise NonFiniteStateError(nonfinite_message(bad, self.run_dir, state["global_step"],
                                                        self.checkpoint_written))
        atomic_save(state, path)
        self.checkpoint_written = True

    def _kept_note(self) -> str:
        if self.checkpoint_written:
            return f"The last good checkpoint in {self.run_dir} is kept."
        return "No checkpoint had been written yet."

    def nonfinite_message(self, step: int, epoch: int) -> str:
        return (f"loss became NaN/inf near step {step} (epoch {epoch + 1}). " + self._kept_note()
                + " Try a lower optim.lr or a longer optim.warmup_epochs.")
