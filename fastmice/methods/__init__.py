"""The registry of methods: a name -> a `Method` class (fastmice.methods.base), whose `Config` is the
`method:` section of a run's config. A method defined anywhere joins with `register_method`.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from fastmice.methods.base import EpochData, Method, MethodConfig, StepOutput
from fastmice.methods.mice import MiCE
from fastmice.methods.mixem import MixEM
from fastmice.methods.moco import MoCo
from fastmice.methods.simclr import SimCLR
from fastmice.models.resnet import build_backbone

METHODS: dict[str, type[Method]] = {"mice": MiCE, "moco": MoCo, "simclr": SimCLR, "mixem": MixEM}

__all__ = ["METHODS", "EpochData", "Method", "MethodConfig", "StepOutput", "backbone_weights", "build_method",
           "method_class", "register_method"]


def register_method(name: str, cls: type[Method]) -> type[Method]:
    """Make `cls` trainable as `method: {name: NAME}`; its Config's `name` default should be NAME."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method({name!r}, ...) needs a subclass of fastmice.methods.Method, got {cls!r}")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg: Any) -> Method:
    """The run config's method on its backbone (on the CPU, in training mode)."""
    return method_class(cfg.method.name)(cfg.method, build_backbone(cfg.backbone))


def backbone_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights out of any registered method's state_dict (keys without the prefix)."""
    prefixes = sorted({cls.backbone_key for cls in METHODS.values()}, key=len, reverse=True)
    weights = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                weights[key[len(p):]] = value
                break
    return weights
