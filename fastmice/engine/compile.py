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

import functools
from typing import Any, Callable

import torch

from fastmice.core.errors import ConfigError

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_forward(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """torch.compile(fn) in train.compile's mode ("default" is torch's default mode)."""
    if mode == "off":
        return fn
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


@functools.lru_cache(maxsize=None)
def inductor_cpu_gradients_ok() -> bool:
    """Whether Inductor's CPU backend gets the weight gradient of a 1x1 stride-2 convolution (every ResNet
    downsampling shortcut) right on this machine. With torch 2.13 on an AVX2 host (AMD EPYC, no AVX-512) it
    does not: the compiled gradient is off by half its size while eager and the forward agree, so a compiled
    CPU run would silently train another model. Checked once per process against eager (a few seconds)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 8, 8, generator=gen)
    w = torch.randn(8, 4, 1, 1, generator=gen)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, w, stride=2).square().sum()

    grads = []
    for fn in (loss, torch.compile(loss, dynamic=False)):
        leaf = w.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(leaf), leaf)[0])
    return torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def check_cpu_compile(mode: str, device: torch.device) -> None:
    """Refuse train.compile on a CPU whose Inductor miscomputes gradients (inductor_cpu_gradients_ok)."""
    if mode != "off" and device.type == "cpu" and not inductor_cpu_gradients_ok():
        raise ConfigError(f"train.compile={mode} on this CPU: torch {torch.__version__}'s Inductor computes wrong "
                          f"gradients for strided 1x1 convolutions here ({torch.backends.cpu.get_cpu_capability()} "
                          f"host), so the compiled run would not train the model eager does; use "
                          f"train.compile=off on the CPU (compiling is for CUDA)")


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
