"""The one training loop for every method: data on the device, augmented views, the step, the method's
bookkeeping (MiCE: EMA, queue, mu), checkpoints.

The hot path never waits on the host: the loss is summed on the device and read only every
`train.log_every` steps (one sync), where the NaN/inf check also happens. The fast step's switches: bf16
autocast and channels_last (train.amp, train.channels_last: on by default on CUDA), a fused (CUDA) or foreach
optimizer (optim.impl), foreach EMA, torch.compile of the whole forward (train.compile), and x_f and x_g in one
student pass (model.single_pass). fastmice.naive is the slow reference they are measured and tested against.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from fastmice import distributed
from fastmice.augment import augment_batch
from fastmice.checkpoint import (CHECKPOINT_NAME, atomic_save, host_rng_state, load_backbone, load_checkpoint,
                                 restore_host_rng_state)
from fastmice.compile import compile_forward, graph_breaks, mark_step_begin, uses_cudagraphs
from fastmice.config import Config, config_from_dict
from fastmice.data.sources import ImageDataset, load_dataset
from fastmice.loader import DaliBatches, DeviceBatches, dali_loader_for, resolve_loader
from fastmice.models import build_model
from fastmice.optim import build_optimizer, learning_rate
from fastmice.prefetch import ViewPrefetcher
from fastmice.runtime import precision_for, resolve_device


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def default_run_dir(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, dataset: ImageDataset | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        dev = distributed.init(cfg.train.device)   # torchrun, several processes: cuda:LOCAL_RANK, or cpu with gloo
        self.device = dev if dev is not None else resolve_device(cfg.train.device)
        if cfg.optim.batch_size % distributed.world():
            raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is the global batch and must split evenly over "
                             f"the {distributed.world()} processes; use a multiple of {distributed.world()}")
        self.precision = precision_for(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        self.dataset = dataset if dataset is not None else load_dataset(cfg.data)
        n = len(self.dataset)
        if cfg.method in ("mice", "moco") and cfg.model.queue_size > n:
            raise ValueError(f"model.queue_size={cfg.model.queue_size} exceeds the dataset size ({n} images): "
                             f"positives would come back as negatives; use a queue of at most {n}")
        if cfg.model.num_clusters > n:
            raise ValueError(f"model.num_clusters={cfg.model.num_clusters} exceeds the dataset size ({n})")
        self.image_size = self.dataset.images.shape[-1]
        self.crop_size = cfg.data.crop_size or self.image_size
        self.model = build_model(cfg).to(self.device)
        if cfg.train.init_scope == "model" and not cfg.train.init_from:
            raise ValueError(f"{cfg.name}: train.init_scope=model fine-tunes a pre-trained run; give it with "
                             f"--init-from RUN (or set train.init_scope=backbone)")
        if cfg.train.init_from:
            load_backbone(self.model, cfg.train.init_from, cfg.train.init_scope)
        if self.precision.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model)
        self.net = self._parallel(self.model)   # runs the training forward: DDP over several processes
        gen = torch.Generator(device=self.device)
        gen.manual_seed(cfg.train.seed + 1)
        self.loader = resolve_loader(cfg, self.dataset)
        if self.loader == "dali":
            self.batches = DaliBatches(n, cfg.optim.batch_size, cfg.train.seed + 1, self._dali_loader, gen,
                                       world=distributed.world())
        else:
            self.batches = DeviceBatches(self.dataset.images.to(self.device), cfg.optim.batch_size, gen)
        self.prefetcher = None
        if cfg.train.prefetch and self.loader == "memory":
            self.prefetcher = ViewPrefetcher(self.device)
            self.batches.before_draw = self._cancel_prefetch   # a new permutation or a loaded state
        self.mean = torch.tensor(cfg.data.mean, device=self.device)
        self.std = torch.tensor(cfg.data.std, device=self.device)
        self.epoch = 0
        self.global_step = 0
        self._stop_requested = False
        self._compiled = None              # train.compile: the compiled forward, built on the first step
        self.compile_info: dict[str, Any] | None = None   # its record (mode, seconds of the first step, ...)

    def _dali_loader(self, rows: torch.Tensor, seed: int):
        return dali_loader_for(self, rows, seed)

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "global_step": self.global_step,
                "batches": self._batches_state(), "rng": host_rng_state(),
                "image_size": self.image_size, "num_images": len(self.dataset), "time": time.time()}

    def _batches_state(self) -> dict[str, Any]:
        state = self.batches.state_dict()
        if self.prefetcher is not None:   # the generator as it was before the next batch's views were drawn
            state["generator"] = self.prefetcher.generator_state(self.batches.generator)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if not distributed.is_main():   # the checkpoint holds the totals: rank 0 keeps them, the others restart at 0
            for t in self._rank_local_sums():
                t.zero_()
        flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, f in zip(self.optimizer.param_groups, flags):   # this machine's optim.impl, not the saved one
            group.update(f)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batches.load_state_dict(state["batches"], epoch=self.epoch)
        restore_host_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        """Several processes: every rank calls this (the per-rank sums are totalled on rank 0, whose state is
        the global one) and rank 0 writes."""
        distributed.consolidate_sums_(self._rank_local_sums())
        path = self.run_dir / CHECKPOINT_NAME
        if distributed.is_main():
            atomic_save(self.state_dict(), path)
        return path

    def _rank_local_sums(self) -> list[torch.Tensor]:
        return [getattr(self.model, name) for name in getattr(self.model, "rank_local_sums", ())]

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: dict[str, Any] | None = None,
               dataset: ImageDataset | None = None) -> "Trainer":
        """Continue a run from its checkpoint; `overrides` may change e.g. optim.epochs or train.max_steps."""
        state = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
        values = state["config"]
        for section, keys in (overrides or {}).items():
            values[section].update(keys) if isinstance(keys, dict) else values.__setitem__(section, keys)
        trainer = cls(config_from_dict(values), run_dir, dataset)
        if len(trainer.dataset) != state["num_images"]:
            raise ValueError(f"the checkpoint was trained on {state['num_images']} images but the data now has "
                             f"{len(trainer.dataset)}: resume needs the same dataset")
        trainer.load_state_dict(state)
        return trainer

    def _parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself in one process; under torchrun, the model in DistributedDataParallel, which averages
        the gradients over the ranks. Buffers are not broadcast: the queue is the same everywhere by construction
        (gathered keys) and the mu sums are per rank until the end of the epoch."""
        if not distributed.active():
            return model
        train = self.cfg.train
        if hasattr(model, "shuffle_bn"):
            model.shuffle_bn = train.shuffle_bn and not train.sync_bn
        if train.sync_bn:
            if self.device.type != "cuda":
                raise ValueError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU implementation); "
                                 "use train.sync_bn=false on CPU")
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)   # in place: same parameters, same state keys
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=getattr(model, "has_unused_parameters", False))

    # ---- one step -----------------------------------------------------------------------------------
    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The method's independent augmentations of the same images (MiCE: x_f, x_v, x_g)."""
        self._cancel_prefetch()
        return self._views_with(x, self.batches.generator)

    def _cancel_prefetch(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.cancel(self.batches.generator)

    def _views_with(self, x: torch.Tensor, generator: torch.Generator, rows: slice | None = None
                    ) -> list[torch.Tensor]:
        return [augment_batch(x, self.cfg.augment, self.crop_size, self.mean, self.std, generator=generator,
                              out_dtype=self.precision.view_dtype, channels_last=self.precision.channels_last,
                              rows=rows)
                for _ in range(self.model.num_views)]

    def _shard_views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """This process's share of the global batch x's views: the draws of the whole batch (the same stream as
        in one process), the work for its rows only."""
        return self._views_with(x, generator, distributed.shard_rows(x.shape[0]))

    def train_step(self, x: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step on uint8 images x; returns (loss, posterior or None) as device tensors.

        Several processes: x is the global batch; every rank draws the random parameters of all of it (one
        random stream, as in one process) and augments and trains on its share; the loss returned is this
        rank's."""
        self._cancel_prefetch()
        views = self._shard_views(x, self.batches.generator)
        return self.step_on_views(views, lr)

    def step_on_views(self, views: list[torch.Tensor], lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step on ready views (in precision.view_dtype and layout): forward, backward, update.
        Under a CUDA-graph compile mode the tensors returned live in graph memory that the next step
        overwrites: use (or clone) them before the next step, as the loop does."""
        out = self.forward_backward(views)
        self.apply_update(out, lr)
        return out.loss.detach(), out.posterior

    def forward_backward(self, views: list[torch.Tensor]) -> Any:
        """The training forward (compiled under train.compile) and its backward; the gradients are left in the
        parameters' .grad and the method's output (loss, posterior, ...) is returned."""
        self.model.train()
        mode = self.cfg.train.compile
        first = mode != "off" and self._compiled is None
        if first:
            t0 = self._sync_time()
        forward = self._forward()
        if mode != "off" and uses_cudagraphs(mode, self.device) and not distributed.active():
            mark_step_begin()
        out = forward(*views)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if first:
            self._record_compile(mode, self._sync_time() - t0)
        return out

    def apply_update(self, out: Any, lr: float) -> None:
        """Optimizer step at learning rate lr, then the method's bookkeeping (MiCE/MoCo: EMA, enqueue, mu sums)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.model.after_step(out)

    def _train_forward(self, *views: torch.Tensor) -> Any:
        with self.precision.autocast():
            return self.net(*views)

    def _forward(self):
        """The function that runs the training forward: the eager one, or its compiled form (built once)."""
        mode = self.cfg.train.compile
        if mode == "off":
            return self._train_forward
        if self._compiled is None:
            if distributed.active():
                self._compiled = self._train_forward
            else:
                self._compiled = compile_forward(self._train_forward, mode)
        return self._compiled

    def _record_compile(self, mode: str, seconds: float) -> None:
        if distributed.active():
            info = {"type": "compile", "mode": mode, "seconds": None,
                    "skipped": "train.compile is not applied under torchrun: the teacher's all_gathers and "
                               "shuffle-BN split the graph and DDP needs its own bucketing; the step runs eagerly"}
            if distributed.is_main():
                print(f"note: {info['skipped']}")
        else:
            info = {"type": "compile", "mode": mode, "seconds": seconds, "graph_breaks": graph_breaks(),
                    "note": "wall time of the first step: compiling the forward and backward, plus one step"}
        self.compile_info = {**info, "step": self.global_step + 1}
        if self.run_dir.is_dir():
            self._write_metrics(self.compile_info)

    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _next_step(self) -> torch.Tensor:
        """The step on the epoch's next batch at the schedule's learning rate; returns the loss (on the device)."""
        lr = learning_rate(self.cfg, self.epoch, self.batches.pos, self.batches.steps_per_epoch)
        if isinstance(self.batches, DaliBatches):
            loss, _ = self.step_on_views(self.batches.next_views(), lr)   # this rank's share, from DALI
        else:
            loss, _ = self.step_on_views(self._memory_views(), lr)
        self.batches.advance()
        self.global_step += 1
        return loss

    def _memory_views(self) -> list[torch.Tensor]:
        """This rank's views of the current batch; with train.prefetch, the next batch's augmentation is enqueued
        (on a side CUDA stream) before this step is, so the two can run side by side."""
        b = self.batches

        def make(pos: int):
            return lambda: self._shard_views(b.batch(pos), b.generator)
        if self.prefetcher is None:
            return make(b.pos)()
        views = self.prefetcher.take((b.epochs_started, b.pos), make(b.pos), b.generator)
        if b.pos + 1 < b.steps_per_epoch:
            self.prefetcher.prefetch((b.epochs_started, b.pos + 1), make(b.pos + 1), b.generator)
        return views

    def run_steps(self, n: int, within_epoch: bool = False) -> int:
        """Up to n training steps at the schedule's learning rate, without logging, loss checks, end-of-epoch
        work or checkpoints: warm-up, profiling and speed probes. A finished epoch's permutation is replaced by a
        new one without the end-of-epoch work, unless within_epoch, which stops at the end of the epoch instead.
        Returns the number of steps run; the device is not synchronised."""
        done = 0
        while done < n:
            if self.batches.epoch_done:
                if within_epoch and self.batches.started:
                    break
                self.batches.start_epoch()
            self._next_step()
            done += 1
        return done

    def profile(self, steps: int = 10, warmup: int = 3) -> Path:
        """`fastmice train --profile`: a torch.profiler trace of `steps` steps after `warmup` (fastmice.profiling)."""
        from fastmice.profiling import profile_steps
        return profile_steps(self, steps, warmup)

    # ---- the loop -----------------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:  # first signal: finish the step, checkpoint, exit
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def fit(self) -> dict[str, Any]:
        """Train to optim.epochs (or train.max_steps); returns a summary. Checkpoints on the way."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        spe = self.batches.steps_per_epoch
        # Ctrl-C, and the SIGTERM a scheduler or `timeout` sends: finish the step, checkpoint, exit. Decided by
        # thread, not by the current SIGINT handler: background jobs of a shell start with SIGINT ignored.
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig in previous:
                signal.signal(sig, self._request_stop)
        status, last_loss = "finished", float("nan")
        try:
            while self.epoch < cfg.optim.epochs:
                if self._max_steps_reached():   # e.g. resumed at train.max_steps: not one step more
                    status = "max_steps"
                    break
                if self.batches.epoch_done:
                    self.batches.start_epoch()
                loss_sum = torch.zeros((), device=self.device)
                bad = torch.zeros((), dtype=torch.bool, device=self.device)
                steps_here, t0, stop = 0, time.perf_counter(), False
                logged_steps, logged_sum = 0, 0.0
                bar = tqdm(total=spe, initial=self.batches.pos, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                           disable=not (cfg.train.progress and distributed.is_main()), leave=False, dynamic_ncols=True)
                while not self.batches.epoch_done:
                    loss = self._next_step()
                    steps_here += 1
                    loss_sum += loss
                    bad |= ~torch.isfinite(loss)
                    stop = self._stop_requested and not distributed.active()  # several: together, at a log step
                    last = self.batches.epoch_done or stop or self._max_steps_reached()
                    if steps_here % cfg.train.log_every == 0 or last:
                        total, bad_any, stop = self._synced(loss_sum, bad)  # the only host sync
                        if bad_any:
                            raise NonFiniteLossError(
                                f"loss became NaN/inf near step {self.global_step} (epoch {self.epoch + 1}); "
                                f"the last good checkpoint in {self.run_dir} is kept. Try a lower optim.lr "
                                f"or a longer optim.warmup_epochs.")
                        last_loss = total / steps_here
                        rate = steps_here * cfg.optim.batch_size / (time.perf_counter() - t0)
                        interval = steps_here - logged_steps
                        self._write_metrics({"type": "step", "epoch": self.epoch + 1, "step": self.global_step,
                                             "loss": (total - logged_sum) / max(interval, 1),
                                             "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": rate})
                        logged_steps, logged_sum = steps_here, total
                        bar.n = self.batches.pos
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.0f}")
                    if stop or self._max_steps_reached():
                        break
                bar.close()
                if stop or (self._max_steps_reached() and not self.batches.epoch_done):
                    status = "interrupted" if stop else "max_steps"
                    break
                self._end_epoch(last_loss, steps_here, time.perf_counter() - t0)
                if self._max_steps_reached():
                    status = "max_steps"
                    break
        finally:
            if isinstance(self.batches, DaliBatches):   # no pipeline (threads, GPU buffers) kept through evaluation
                self.batches.close()
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if status != "finished":  # a finished run saved at its last epoch
            self.save_checkpoint()
        if status == "interrupted":
            print(f"interrupted: checkpoint written to {self.run_dir / CHECKPOINT_NAME}; "
                  f"continue with: fastmice train --resume {self.run_dir}")
        return {"status": status, "epoch": self.epoch, "global_step": self.global_step, "loss": last_loss}

    def _synced(self, loss_sum: torch.Tensor, bad: torch.Tensor) -> tuple[float, bool, bool]:
        """(loss sum, any non-finite loss, stop requested) as every rank sees them: several processes average
        the loss, and stop or fail together (one small all_reduce, at log steps only)."""
        if not distributed.active():
            return float(loss_sum), bool(bad), self._stop_requested
        t = torch.stack([loss_sum.float(), bad.float(),
                         torch.tensor(float(self._stop_requested), device=self.device)])
        total, n_bad, n_stop = distributed.all_reduce_sum_(t).tolist()
        return total / distributed.world(), n_bad > 0, n_stop > 0

    def _max_steps_reached(self) -> bool:
        return self.cfg.train.max_steps is not None and self.global_step >= self.cfg.train.max_steps

    def _refine_mu(self) -> dict[str, Any]:
        """Appendix E: SGD on mu alone, the networks fixed, for up to model.mu_sgd_passes passes over the data
        (a random stream of its own, so the training stream and exact resume are untouched)."""
        cfg, model = self.cfg, self.model
        lr = learning_rate(cfg, self.epoch, self.batches.steps_per_epoch - 1, self.batches.steps_per_epoch)
        opt = torch.optim.SGD([model.mu], lr=lr, momentum=cfg.optim.momentum)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(cfg.train.seed * 1_000_003 + self.epoch)
        images, bs = self.batches.images, cfg.optim.batch_size
        passes, change = 0, float("inf")
        trainable = model.mu.requires_grad
        model.mu.requires_grad_(True)      # also under model.mu_grad: false (no SGD on mu during the epoch)
        while passes < cfg.model.mu_sgd_passes and change > cfg.model.mu_sgd_tol:
            start = model.mu.detach().clone()
            perm = torch.randperm(images.shape[0], device=self.device, generator=gen)
            for i in range(images.shape[0] // bs):
                views = self._shard_views(images[perm[i * bs:(i + 1) * bs]], gen)
                with self.precision.autocast():
                    loss = model.mu_only_loss(*views)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if distributed.active():   # the mean gradient over the ranks, as DDP would give
                    distributed.all_reduce_sum_(model.mu.grad).div_(distributed.world())
                opt.step()
            passes += 1
            change = float((model.mu.detach() - start).abs().mean())   # once per pass: a host sync is fine here
        model.mu.requires_grad_(trainable)
        model.mu.grad = None
        return {"mu_sgd_passes": passes, "mu_sgd_change": change}

    def _end_epoch(self, loss: float, steps: int, seconds: float) -> None:
        mu_sgd = self._refine_mu() if self.cfg.model.mu_sgd_passes else {}
        extra = self.model.end_epoch()         # MiCE: cluster sizes of the epoch, then mu by Eq. 13
        self.epoch += 1
        self._write_metrics({
            "type": "epoch", "epoch": self.epoch, "step": self.global_step, "loss": loss,
            "lr": learning_rate(self.cfg, self.epoch - 1, self.batches.steps_per_epoch - 1,
                                self.batches.steps_per_epoch),
            "samples_per_s": steps * self.cfg.optim.batch_size / max(seconds, 1e-9),
            "epoch_seconds": seconds, **extra, **mu_sgd})
        every = self.cfg.eval.probe_every
        if every and self.epoch % every == 0 and self.dataset.labels is not None:
            result = self.quick_eval()      # every process infers its share; rank 0 scores and writes
            if distributed.is_main():
                self._write_metrics({"type": "eval", "epoch": self.epoch, "step": self.global_step, **result})
        every = self.cfg.eval.embed_every
        if every and (self.epoch == 1 or self.epoch % every == 0 or self.epoch == self.cfg.optim.epochs):
            self.save_embeddings()
        if self.epoch % self.cfg.train.checkpoint_every == 0 or self.epoch == self.cfg.optim.epochs:
            self.save_checkpoint()

    def save_embeddings(self) -> Path | None:
        """RUN/embeddings/epoch_NNNN.npz: embedding, cluster (the primary readout) and label of a fixed
        seeded subsample, for the t-SNE figures of `fastmice report`."""
        import numpy as np

        from fastmice.evaluate import infer_dataset, predictions
        from fastmice.figures import subsample

        if not distributed.is_main():
            return None
        idx = subsample(len(self.dataset), self.cfg.eval.embed_samples, self.cfg.train.seed)
        out = infer_dataset(self.model, self.dataset.images[torch.from_numpy(idx)], self.cfg, self.device,
                            self.crop_size, self.precision.autocast, self.precision.channels_last)
        cluster = next(iter(predictions(out, self.cfg.model.num_clusters, self.cfg).values()))
        path = self.run_dir / "embeddings" / f"epoch_{self.epoch:04d}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = self.dataset.labels[torch.from_numpy(idx)].numpy() if self.dataset.labels is not None else None
        np.savez_compressed(path, index=idx, embedding=out["embedding"].float().cpu().numpy(), cluster=cluster,
                            **({"label": labels} if labels is not None else {}))
        return path

    def quick_eval(self) -> dict[str, Any]:
        """ACC/NMI/ARI of every readout and the linear probe, without writing files (eval.probe_every). Several
        processes: all call it and infer their share of the images; rank 0 gets the scores, the others {}."""
        from fastmice.evaluate import infer_dataset, linear_probe, predictions
        from fastmice.metrics import cluster_metrics

        out = infer_dataset(self.model, self.dataset.images, self.cfg, self.device, self.crop_size,
                            self.precision.autocast, self.precision.channels_last, sharded=True)
        if not distributed.is_main():
            return {}
        labels = self.dataset.labels.numpy()
        result = {name: {m: float(v) for m, v in cluster_metrics(labels, pred).items()}
                  for name, pred in predictions(out, self.cfg.model.num_clusters, self.cfg).items()}
        if self.cfg.eval.linear_probe:
            result["linear_probe"] = linear_probe(out["features"], self.dataset.labels, seed=self.cfg.train.seed)
        return result
