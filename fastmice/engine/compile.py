"""torch.compile of the training step (train.compile), kept apart from the trainer's loop.

What is compiled is the whole training forward: the teacher's no-grad pass, the student's passes and the loss,
as one function of the views (AOTAutograd compiles the matching backward). The optimizer step and the method's
bookkeeping (EMA, enqueue, mu sums) stay outside: they are already a few foreach / fused kernels and they mutate
state that CUDA graphs would otherwise have to treat as outputs. Data loading and augmentation stay outside
too (DALI cannot be captured in a CUDA graph; the batched torch augmentation could be, but its random draws
would then be fixed at capture).

Modes (torch.compile's): default (Inductor kernels), reduce-overhead (Inductor + CUDA graphs: one launch per
step on a GPU; on the CPU the same as default), max-autotune (also searches GEMM/conv configurations; slow to
build) and max-autotune-no-cudagraphs. The graph is specialised on the batch shape (dynamic=False): the
trainer's batches all have the same size (drop_last).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_forward(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """torch.compile(fn) in train.compile's mode ("default" is torch's default mode)."""
    if mode == "off":
        return fn
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def uses_cudagraphs(mode: str, device: torch.device) -> bool:
    """Whether the compiled step replays CUDA graphs: its outputs then live in graph-owned memory that the
    next step overwrites, and each step must be announced (torch.compiler.cudagraph_mark_step_begin)."""
    return device.type == "cuda" and mode in CUDAGRAPH_MODES


def mark_step_begin() -> None:
    torch.compiler.cudagraph_mark_step_begin()


def graph_breaks() -> int | None:
    """How many graph breaks Dynamo has counted in this process (None where the counter is not available).
    Each break splits the step into separately compiled pieces with Python in between; zero is the goal."""
    try:
        from torch._dynamo.utils import counters   # a private counter, read best-effort for the compile record
        return int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001 - informational only
        return None
