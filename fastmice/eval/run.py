"""A trained run, loaded back from its folder: the config, the model on a device, and how to feed it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmice.core.checkpoint import load_checkpoint
from fastmice.config import Config, config_from_dict
from fastmice.core.checkpoint import CHECKPOINT_NAME
from fastmice.core.device import precision_for, resolve_device
from fastmice.core.state_match import load_model_state
from fastmice.eval.inference import infer_dataset
from fastmice.methods import Method, build_method


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    model: Method
    device: torch.device
    image_size: int          # side of the images the model was trained on
    crop_size: int           # side of the views fed to the network
    autocast: Any            # context-manager factory (bf16 on CUDA) or None
    channels_last: bool
    epoch: int
    global_step: int

    @torch.no_grad()
    def infer(self, images: torch.Tensor, progress: bool = False) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) of the training size -> the model's readouts, on the run's device."""
        return infer_dataset(self.model, images, self.cfg, self.device, self.crop_size, self.autocast,
                             self.channels_last, progress=progress)


def load_run(run_dir: str | Path, device: str = "auto", overrides: dict[str, Any] | None = None) -> LoadedRun:
    """Rebuild the model of RUN/checkpoint.pt in eval mode; `overrides` edits the saved config (e.g. data.root)."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir)
    cfg = config_from_dict(state["config"], overrides, where=f"{run_dir}'s config")
    dev = resolve_device(device)
    model = build_method(cfg)
    saved = config_from_dict(state["config"], where=f"{run_dir}'s config").to_dict() if overrides else None
    load_model_state(model, state["model"], saved, cfg.to_dict() if overrides else None,
                     where=str(run_dir / CHECKPOINT_NAME), purpose="load")
    model.to(dev).eval()
    prec = precision_for(cfg, dev)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedRun(run_dir, cfg, model, dev, state["image_size"], cfg.data.crop_size or state["image_size"],
                     prec.autocast if prec.view_dtype == torch.bfloat16 else None, prec.channels_last,
                     state["epoch"], state["global_step"])
