"""The one training loop for every method: the feed's views, the step, the method's hooks, checkpoints.

The hot path never waits on the host: the loss is summed on the device and read only every `train.log_every`
steps (one sync), where the NaN/inf check also happens. `step` is the unit that is compiled (train.compile)
and, on CUDA, replayed as a graph. The naive reference it is measured against is bench/naive.py.
"""
from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastmice.config import Config, config_from_dict
from fastmice.core import distributed
from fastmice.core.checkpoint import CHECKPOINT_NAME, host_rng_state, load_checkpoint, restore_host_rng_state
from fastmice.core.device import precision_for, resolve_device
from fastmice.core.state_match import load_model_state
from fastmice.data.dataset import ImageDataset
from fastmice.data.sources import load_dataset
from fastmice.engine.compile import check_cpu_compile, compile_forward, mark_step_begin, uses_cudagraphs
from fastmice.engine.data import build_feed
from fastmice.engine.loggers import require
from fastmice.engine.optim import build_optimizer, learning_rate
from fastmice.engine.pretrained import load_pretrained
from fastmice.engine.run_log import NonFiniteLossError, RunLog, compile_record
from fastmice.eval.probe import probe, save_embedding_snapshot
from fastmice.methods import EpochData, StepOutput, build_method


def default_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, dataset: ImageDataset | None = None):
        self.cfg = cfg
        require(cfg.train.loggers)   # a dashboard's missing package: one line now, not after loading the data
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        dev = distributed.init(cfg.train.device)   # torchrun, several processes: cuda:LOCAL_RANK, or cpu with gloo
        self.device = dev if dev is not None else resolve_device(cfg.train.device)
        if cfg.optim.batch_size % distributed.world():
            raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is the global batch and must split evenly over "
                             f"the {distributed.world()} processes; use a multiple of {distributed.world()}")
        self.precision = precision_for(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)
        self.image_size = self.dataset.images.shape[-1]
        self.crop_size = cfg.data.crop_size or self.image_size
        self.method = build_method(cfg).to(self.device)
        self.method.check_data(len(self.dataset))
        if cfg.train.init_scope == "model" and not cfg.train.init_from:
            raise ValueError(f"{cfg.name}: train.init_scope=model fine-tunes a pre-trained run; give it with "
                             f"--init-from RUN (or set train.init_scope=backbone)")
        if cfg.train.init_from:
            load_pretrained(self.method, cfg.train.init_from, cfg.train.init_scope, cfg.to_dict())
        if self.precision.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.method)
        if distributed.active():
            self.method.set_shuffle_bn(cfg.train.shuffle_bn and not cfg.train.sync_bn)
        self.net = distributed.wrap(self.method, self.device, cfg.train.sync_bn,
                                    self.method.find_unused_parameters)
        self.loader, self.feed = build_feed(cfg, self.dataset, self.method, self.device, self.precision,
                                            self.crop_size)
        self.log = RunLog(self.run_dir, enabled=distributed.is_main())
        self.epoch = 0
        self.global_step = 0
        self.epoch_loss = (0.0, 0)              # (sum, steps) of the epoch in progress, kept through a resume
        self.logged_loss = (0.0, 0)             # epoch_loss at the last step record: the next covers what follows
        self.stop_requested = False
        self._compiled = None                   # train.compile: the compiled forward, built on the first step
        self.compile_info: dict[str, Any] | None = None

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
                "epoch_loss": self.epoch_loss, "logged_loss": self.logged_loss, "batches": self.feed.state_dict(),
                "rng": host_rng_state(), "image_size": self.image_size, "num_images": len(self.dataset),
                "time": time.time()}

    def load_state_dict(self, state: dict[str, Any], where: str = "the checkpoint") -> None:
        """Continue from `state` (a checkpoint); a model that does not fit it is explained by the settings
        that differ (fastmice.core.state_match), and nothing is loaded."""
        saved = config_from_dict(state["config"], where=where).to_dict() if "config" in state else None
        load_model_state(self.method, state["model"], saved, self.cfg.to_dict(), where=where, purpose="resume")
        if not distributed.is_main():   # the checkpoint holds the totals: rank 0 keeps them, the others restart at 0
            for t in self.method.rank_local_buffers():
                t.zero_()
        flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, f in zip(self.optimizer.param_groups, flags):   # this machine's optim.impl, not the saved one
            group.update(f)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.epoch_loss = tuple(state.get("epoch_loss", (0.0, 0)))
        self.logged_loss = tuple(state.get("logged_loss", self.epoch_loss))
        self.feed.load_state_dict(state["batches"], epoch=self.epoch)
        restore_host_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        """Several processes: every rank calls this (the per-rank sums are totalled on rank 0, whose state is
        the global one) and rank 0 writes. A state holding NaN or inf is refused, not saved."""
        distributed.consolidate_sums_(self.method.rank_local_buffers())
        path = self.run_dir / CHECKPOINT_NAME
        if distributed.is_main():
            self.log.save_checkpoint(self.state_dict(), path)
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None,
               dataset: ImageDataset | None = None) -> "Trainer":
        """Continue a run from its checkpoint; `overrides` may change e.g. optim.epochs or train.max_steps."""
        state = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
        trainer = cls(config_from_dict(state["config"], overrides, where=f"{run_dir}'s checkpoint"), run_dir,
                      dataset)
        if len(trainer.dataset) != state["num_images"]:
            raise ValueError(f"the checkpoint was trained on {state['num_images']} images but the data now has "
                             f"{len(trainer.dataset)}: resume needs the same dataset")
        trainer.load_state_dict(state, where=str(Path(run_dir) / CHECKPOINT_NAME))
        return trainer

    # ---- one step -----------------------------------------------------------------------------------
    def step(self, views: list[torch.Tensor], index: torch.Tensor | None, lr: float) -> StepOutput:
        """Forward (compiled under train.compile), backward, optimizer step at lr, the method's after-step work.
        Under a CUDA-graph mode the tensors returned live in graph memory that the next step overwrites."""
        self.method.train()
        mode = self.cfg.train.compile
        first = mode != "off" and self._compiled is None
        t0 = self.sync_time() if first else 0.0
        forward = self._forward()
        if mode != "off" and uses_cudagraphs(mode, self.device) and not distributed.active():
            mark_step_begin()
        out = forward(views, index)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if first:
            self.compile_info = compile_record(mode, self.sync_time() - t0, self.global_step + 1)
            self.log.write(self.compile_info)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.method.after_step(out)
        return out

    def _train_forward(self, views: list[torch.Tensor], index: torch.Tensor | None) -> StepOutput:
        with self.precision.autocast():
            return self.net(views, index)

    def _forward(self):
        """The eager training forward or its compiled form, built once (eager under torchrun: see compile)."""
        if self.cfg.train.compile == "off" or distributed.active():
            return self._train_forward
        if self._compiled is None:
            check_cpu_compile(self.cfg.train.compile, self.device)
            self._compiled = compile_forward(self._train_forward, self.cfg.train.compile)
        return self._compiled

    def sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def next_step(self) -> torch.Tensor:
        """The step on the feed's next batch at the schedule's learning rate; returns the loss (on the device)."""
        lr = learning_rate(self.cfg, self.epoch, self.feed.pos, self.feed.steps_per_epoch)
        self.method.set_progress(self.epoch + self.feed.pos / self.feed.steps_per_epoch)
        views, index = self.feed.next_views()
        loss = self.step(views, index, lr).loss.detach()
        self.feed.advance()
        self.global_step += 1
        return loss

    def run_steps(self, n: int, within_epoch: bool = False) -> int:
        """Up to n steps without logging, loss checks, end-of-epoch work or checkpoints (warm-up, profiling,
        speed probes); a finished epoch starts a new permutation unless within_epoch, which stops there.
        Returns the number of steps run; the device is not synchronised."""
        done = 0
        while done < n:
            if self.feed.epoch_done:
                if within_epoch and self.feed.started:
                    break
                self.feed.start_epoch()
            self.next_step()
            done += 1
        return done

    # ---- the loop -----------------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:  # first signal: finish the step, checkpoint, exit
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    def fit(self) -> dict[str, Any]:
        """Train to optim.epochs (or train.max_steps); returns a summary. Checkpoints on the way."""
        cfg, spe = self.cfg, self.feed.steps_per_epoch
        self.log.start(cfg.to_dict(), self.global_step)
        # Ctrl-C, and the SIGTERM a scheduler or `timeout` sends: finish the step, checkpoint, exit. Decided by
        # thread, not by the current SIGINT handler: background jobs of a shell start with SIGINT ignored.
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig in previous:
                signal.signal(sig, self._request_stop)
        status, last_loss, stop = "finished", float("nan"), False
        try:
            while self.epoch < cfg.optim.epochs and not stop:
                if self._max_steps_reached():   # e.g. resumed at train.max_steps: not one step more
                    status = "max_steps"
                    break
                if self.feed.epoch_done:
                    self.feed.start_epoch()
                    self.epoch_loss = self.logged_loss = (0.0, 0)
                start_sum, start_steps = self.epoch_loss
                loss_sum = torch.full((), start_sum, device=self.device)
                bad = torch.zeros((), dtype=torch.bool, device=self.device)
                steps_here, t0 = start_steps, time.perf_counter()
                bar = tqdm(total=spe, initial=self.feed.pos, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                           disable=not (cfg.train.progress and distributed.is_main()), leave=False, dynamic_ncols=True)
                while not self.feed.epoch_done:
                    loss = self.next_step()
                    steps_here += 1
                    loss_sum += loss
                    bad |= ~torch.isfinite(loss)
                    stop = self.stop_requested and not distributed.active()  # several: together, at a log step
                    # A step record at the log steps and the epoch's end only, never at a stop, so that a
                    # stopped and resumed run logs the uninterrupted run's records (logged_loss carries over).
                    due = steps_here % cfg.train.log_every == 0 or self.feed.epoch_done or self._max_steps_reached()
                    if due or stop:
                        total, bad_any, stop = self._synced(loss_sum, bad)  # the only host sync
                        if bad_any:
                            raise NonFiniteLossError(self.log.nonfinite_message(self.global_step, self.epoch))
                        self.epoch_loss = (total, steps_here)
                        last_loss = total / steps_here
                        rate = (steps_here - start_steps) * cfg.optim.batch_size / (time.perf_counter() - t0)
                        if due:
                            logged_sum, logged_steps = self.logged_loss
                            self.log.write({"type": "step", "epoch": self.epoch + 1, "step": self.global_step,
                                            "loss": (total - logged_sum) / max(steps_here - logged_steps, 1),
                                            "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate})
                            self.logged_loss = (total, steps_here)
                        bar.n = self.feed.pos
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.0f}")
                    if stop or self._max_steps_reached():
                        break
                bar.close()
                if self.feed.epoch_done:   # also when the stop came in the epoch's last step
                    self._end_epoch(last_loss, steps_here - start_steps, time.perf_counter() - t0)
                if stop and self.epoch < cfg.optim.epochs:   # a stop in the very last step: finished
                    status = "interrupted"
                elif self._max_steps_reached():
                    status = "max_steps"
                    break
        finally:
            self.feed.close()   # DALI: no pipeline (threads, GPU buffers) kept through evaluation
            self.log.flush()    # the dashboards' buffered values on disk (they stay open for the evaluation)
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if status != "finished":  # a finished run saved at its last epoch
            self.save_checkpoint()
        if status == "interrupted":
            print(f"interrupted: checkpoint written to {self.run_dir / CHECKPOINT_NAME}; "
                  f"continue with: fastmice train --resume {self.run_dir}")
        return {"status": status, "epoch": self.epoch, "global_step": self.global_step, "loss": last_loss}

    def close(self, exit_code: int = 0) -> None:
        """Close the run's dashboards (train.loggers); W&B marks the run with `exit_code`. A later fit() reopens
        them. The command line calls it after the evaluation."""
        self.log.close(exit_code)

    def _synced(self, loss_sum: torch.Tensor, bad: torch.Tensor) -> tuple[float, bool, bool]:
        """(loss sum, any non-finite loss, stop requested) as every rank sees them: several processes average
        the loss, and stop or fail together (one small all_reduce, at log steps only)."""
        if not distributed.active():
            return float(loss_sum), bool(bad), self.stop_requested
        t = torch.stack([loss_sum.float(), bad.float(),
                         torch.tensor(float(self.stop_requested), device=self.device)])
        total, n_bad, n_stop = distributed.all_reduce_sum_(t).tolist()
        return total / distributed.world(), n_bad > 0, n_stop > 0

    @property
    def finished(self) -> bool:
        """Whether training has reached optim.epochs (or train.max_steps): fit() would do nothing."""
        return self.epoch >= self.cfg.optim.epochs or self._max_steps_reached()

    def _max_steps_reached(self) -> bool:
        return self.cfg.train.max_steps is not None and self.global_step >= self.cfg.train.max_steps

    def epoch_data(self) -> EpochData:
        """What the method's end-of-epoch hook may read (the whole dataset, the views as training makes them)."""
        spe = self.feed.steps_per_epoch
        return EpochData(self.epoch, learning_rate(self.cfg, self.epoch, spe - 1, spe), self.cfg.optim.momentum,
                         self.feed.images, self.cfg.optim.batch_size, self.feed.views, self.precision.autocast,
                         self.device, self.cfg.train.seed)

    def _end_epoch(self, loss: float, steps: int, seconds: float) -> None:
        extra = self.method.end_epoch(self.epoch_data())
        self.epoch += 1
        spe = self.feed.steps_per_epoch
        self.log.write({"type": "epoch", "epoch": self.epoch, "step": self.global_step, "loss": loss,
                        "lr": learning_rate(self.cfg, self.epoch - 1, spe - 1, spe),
                        "samples_per_s": steps * self.cfg.optim.batch_size / max(seconds, 1e-9),
                        "epoch_seconds": seconds, **extra})
        cfg = self.cfg
        if cfg.eval.probe_every and self.epoch % cfg.eval.probe_every == 0 and self.dataset.labels is not None:
            result = probe(self.method, self.dataset, cfg, self.device, self.crop_size, self.precision)
            self.log.write({"type": "eval", "epoch": self.epoch, "step": self.global_step, **result})
        every = cfg.eval.embed_every
        if every and (self.epoch == 1 or self.epoch % every == 0 or self.epoch == cfg.optim.epochs):
            save_embedding_snapshot(self.method, self.dataset, cfg, self.device, self.crop_size, self.precision,
                                    self.run_dir / "embeddings" / f"epoch_{self.epoch:04d}.npz")
        if self.epoch % cfg.train.checkpoint_every == 0 or self.epoch == cfg.optim.epochs:
            self.save_checkpoint()

    def profile(self, steps: int = 10, warmup: int = 3) -> Path:
        """`fastmice train --profile`: a torch.profiler trace of `steps` steps after `warmup`."""
        from fastmice.engine.profiling import profile_steps   # torch.profiler is imported only when asked for
        return profile_steps(self, steps, warmup)
