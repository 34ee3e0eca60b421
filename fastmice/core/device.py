"""Where a run computes and in what precision: the device, bf16 autocast and channels_last."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from fastmice.core.errors import ConfigError



def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine (torch "
                          f"{torch.__version__}, {'a CPU build' if torch.version.cuda is None else 'no GPU visible'});"
                          f" use --train.device=auto or cpu")
    return dev


@dataclass
class Precision:
    autocast: Any              # a context manager factory
    view_dtype: torch.dtype
    channels_last: bool


def precision_for(cfg: Any, device: torch.device) -> Precision:
    """train.amp and train.channels_last of a run config on `device`."""
    bf16 = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    cl = cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda")
    if bf16:
        return Precision(lambda: torch.autocast(device.type, dtype=torch.bfloat16), torch.bfloat16, cl)
    return Precision(nullcontext, torch.float32, cl)
